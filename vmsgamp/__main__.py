import sys

from vmsgamp.cli import main

sys.exit(main())
