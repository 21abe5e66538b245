import sys

from fedhlm_device.cli import main

sys.exit(main())
