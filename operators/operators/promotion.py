"""PromotionOperator: the promotion gate (`pipelines.relevance.promotion.promote`) as a task.

The gate scores the challenger and the champion on the same rows, so it loads models: it runs where the other
stages run, as the pipeline's `promote` stage in a Ray job (`python -m ray_jobs <pipeline> promote`), with the same
submission-id, retry and log guarantees as RayJobOperator, and its decision recorded in the stage's manifest and
MLflow child run. This operator adds the decision: it logs it, returns it as the XCom value, and with
`fail_if_kept=True` fails the task when the gate keeps the current champion (for alerting on a retraining that
did not improve). A kept champion is a normal outcome of the gate, so the default is to succeed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowException

from operators.operators.ray_job import RayJobOperator


class PromotionOperator(RayJobOperator):
    """Run the promotion gate of a pipeline and report its decision (promoted or kept, and why)."""

    ui_color = "#ffe9b3"

    def __init__(self, *, stage: str = "promote", fail_if_kept: bool = False, **kwargs) -> None:
        super().__init__(stage=stage, **kwargs)
        self.fail_if_kept = fail_if_kept

    def result(self, sid: str, run_key: str) -> dict[str, Any]:
        out = super().result(sid, run_key)
        decision = None
        if out.get("stage_dir"):
            try:
                decision = json.loads((Path(out["stage_dir"]) / "decision.json").read_text())
            except (OSError, json.JSONDecodeError):
                decision = None
        decision = decision or out.get("summary") or {}
        out["decision"] = decision
        if "promoted" in decision:
            verdict = "PROMOTED to champion" if decision["promoted"] else "KEPT the current champion"
            self.log.info("promotion gate: %s (%s)", verdict, decision.get("reason", "no reason recorded"))
            if self.fail_if_kept and not decision["promoted"]:
                raise AirflowException(f"the gate kept the current champion: {decision.get('reason')}")
        else:
            self.log.warning("no decision found in %s; check the promote stage's MLflow run",
                             out.get("stage_dir", "the stage output"))
        return out
