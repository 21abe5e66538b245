import sys

from fedhlm.cli import main

sys.exit(main())
