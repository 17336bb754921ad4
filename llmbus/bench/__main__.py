"""`python -m llmbus.bench`, the same as `llmbus bench`."""

import sys

from llmbus.bench.main import main

sys.exit(main())
