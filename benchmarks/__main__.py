"""``python -m benchmarks [--quick] [--programs a,b] [--repeats K]``."""
import sys

from benchmarks.run import main

sys.exit(main())
