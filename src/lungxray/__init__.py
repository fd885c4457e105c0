"""lungxray: a folder of labelled chest X-rays in, a tuned, honestly evaluated, safely saved classifier out.

The package holds one module per pipeline stage (data, splits, models, train, tune, evaluate,
bundle, pipeline, cli). Importing it does no work and imports no heavy dependency.
"""

__version__ = "0.1.0"
