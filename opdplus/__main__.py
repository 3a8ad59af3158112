import sys

from opdplus.commands import main

sys.exit(main())
