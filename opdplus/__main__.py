import sys

from opdplus.cli import main

sys.exit(main())
