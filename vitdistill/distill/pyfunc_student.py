"""The distilled student as an MLflow pyfunc model, logged from code (this file), never pickled.

    model = mlflow.pyfunc.load_model("models:/vitdistill-student@champion")
    logits = model.predict(images)   # (N, 3, H, W) float32, normalised as the student expects -> (N, C)

MLflow stores this file with the model; loading runs it, and :class:`StudentModel` rebuilds the
student from the ``architecture`` (JSON) and ``weights`` (safetensors) artifacts. Logged by
:meth:`vitdistill.tracking.Tracker.log_student`.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class StudentModel(PythonModel):
    def load_context(self, context) -> None:  # no __future__ annotations: MLflow reads predict's hints
        from vitdistill.distill.students import load_student

        self.model = load_student(context.artifacts["architecture"], context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))  # (N, 3, H, W)
        with torch.inference_mode():
            return self.model(x)["logits"].float().numpy()  # (N, C)


mlflow.models.set_model(StudentModel())
