"""lmms-eval model registration: the `lmms_eval.models` entry point points here.

Each technique module under lmms_eval_plugins/models defines a simple class (loglikelihood
and generation, used with --force_simple) and a chat class (the default for the name).
"""

from lmms_eval.models.registry_v2 import ModelManifest

from .models import MODELS, SIMPLE_ONLY


def _manifest(name, module, cls, aliases):
    path = f"lmms_eval_plugins.models.{module}.{cls}"
    chat = None if module in SIMPLE_ONLY else path + "Chat"  # None: lmms-eval resolves the name to the simple class
    return ModelManifest(model_id=name, simple_class_path=path, chat_class_path=chat, aliases=aliases)


MANIFESTS = [_manifest(name, *entry) for name, entry in MODELS.items()]
