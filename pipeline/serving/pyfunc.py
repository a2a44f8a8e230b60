"""MLflow "model from code" entry point: defines the pyfunc, so nothing is pickled at log time."""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model

from pipeline.serving.classifier import ImageClassifier


class ImageClassifierPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.classifier = ImageClassifier(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        return self.classifier.predict(model_input)


set_model(ImageClassifierPyfunc())
