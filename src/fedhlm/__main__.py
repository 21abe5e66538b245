import sys

from fedhlm.cli.main import main

sys.exit(main())
