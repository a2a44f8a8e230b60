"""The shipped model in use: the classifier on pixels, the MLflow pyfunc, `predict`."""
