"""lmms-eval plugin: the model `lavida_shirg` (`lmms_eval --model lavida_shirg --model_args pretrained=FOLDER,...`).

Registered through the Python entry-point group `lmms_eval.models` (pyproject.toml), which lmms-eval reads when it
builds its model registry. This module stays importable without lmms-eval; the model class is
`lavida_shirg_lmms.model.LavidaShirgLmms` (imported only when the model is chosen).
"""

MODEL_NAME = "lavida_shirg"
MODEL_CLASS_PATH = "lavida_shirg_lmms.model.LavidaShirgLmms"


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest of `lavida_shirg` (a simple, text + image model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)
