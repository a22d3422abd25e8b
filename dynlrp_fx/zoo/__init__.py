from ._core import *  # noqa
from ._core import ZOO, ZooEntry, get, names, export_entry
from . import _torchvision  # noqa
from . import _transformers  # noqa
