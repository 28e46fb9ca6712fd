"""Export of a layer to another framework's format: ``layer.to_torch()``, ``layer.to_onnx(path)``.

The exporters live in ``gpurnn.interop``, a layer above ``gpurnn.nn`` that nn does not import;
interop registers them here when it is imported, which ``import gpurnn`` does."""
_EXPORTERS = {}


def register_exporter(name, function):
    """Make ``function(layer, *args, **options)`` the exporter ``name``."""
    _EXPORTERS[name] = function


def export(name, layer, *args, **options):
    """Run the exporter ``name`` on ``layer``."""
    if name not in _EXPORTERS:
        raise RuntimeError(f"no exporter {name!r} is registered (gpurnn.interop registers "
                           f"them: import gpurnn)")
    return _EXPORTERS[name](layer, *args, **options)
