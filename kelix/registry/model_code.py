"""MLflow "models from code" entry: the logged model stores this file, not a pickled Python object.

Loading a registered Kelix model therefore unpickles nothing: MLflow runs this file, which takes the model
class from the installed `kelix` package, and the class reads the bundle's safetensors weights.
"""
import mlflow

from kelix.registry.pyfunc import KelixPyfunc

mlflow.models.set_model(KelixPyfunc())
