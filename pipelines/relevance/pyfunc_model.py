"""MLflow "models from code" entry: logged with the model, run when it loads (no pickled Python object).

See `pipelines.relevance.serving.log_relevance_model`; the class itself lives in `serving.py`.
"""

from mlflow.models import set_model

from pipelines.relevance.serving import RelevanceModel

set_model(RelevanceModel())
