"""The composition root that `bentoml serve` and bentofile.yaml point at.

One model service per served model (each with its own workers, CPU or CUDA, scaled apart) and one
`Gateway` (public routes, model choice, validation, tokenization, the API shapes), composed from the
settings by bentoformers.serving.composition. The served models are the built entries of the model list
(settings can narrow them).
"""

from bentoformers.serving.composition import compose
from bentoformers.settings import Settings

Gateway = compose(Settings())  # raises with a hint when nothing is built
