"""MLflow "models from code" entry: logged with the model, run when it loads (no pickled Python object).

See `pipelines.preranking.serving.log_preranker`; the class itself lives in `serving.py`.
"""

from mlflow.models import set_model

from pipelines.preranking.serving import PreRankerModel

set_model(PreRankerModel())
