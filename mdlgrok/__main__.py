import sys

from mdlgrok.cli import main

sys.exit(main())
