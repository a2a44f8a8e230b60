"""MLflow "model from code" entry point: defines the pyfunc, so nothing is pickled at log time."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

from pipeline.serving.classifier import ImageClassifier


class ImageClassifierPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.classifier = ImageClassifier(context.artifacts["checkpoint"])

    # the DataFrame hint only declares the input: MLflow infers no schema from it (the logged
    # signature does the checking) and stops warning at every log and load for want of a hint
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.classifier.predict(model_input)


set_model(ImageClassifierPyfunc())
