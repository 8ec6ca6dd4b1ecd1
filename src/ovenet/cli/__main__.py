"""``python -m ovenet.cli ...`` (also what torchrun runs: ``torchrun ... -m ovenet.cli train CONFIG``)."""

import sys

from ovenet.cli.main import main

sys.exit(main())
