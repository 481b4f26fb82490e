"""`python -m kelix.stages run NAME ...`: one stage in this process (kelix/stages/cli.py)."""
import sys

from kelix.stages.cli import main

sys.exit(main())
