import sys

from qasr.cli import main

sys.exit(main())
