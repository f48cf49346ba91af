"""Registers the pruned-model classes with the transformers Auto classes.

After this import, ``AutoModelForCausalLM.from_pretrained(pruned_folder)`` works in this
process without ``trust_remote_code``: the classes come from the installed hgsp package, not
from the folder.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling_hgsp import PRUNED_CLASSES


def register() -> None:
    for config_cls, model_cls in PRUNED_CLASSES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass


register()
