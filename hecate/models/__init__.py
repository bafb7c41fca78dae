"""The model zoo. Every module named `zoo_*.py` here registers its architectures and presets
(hecate.models.registry) when the package is imported."""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("zoo_"):
        importlib.import_module(f"{__name__}.{_info.name}")
