"""ResNet-18 on real, synthetic and mixed data: models, batches, the trainer, the arms, the stage and its figures."""

from synthgap_helpers import submodules

__getattr__ = submodules(__name__)
