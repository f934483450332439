import sys

from isometry.cli import main

sys.exit(main())
