"""`python -m operators.demo DAG_ID [DAG_ID ...]`: the latest run of each DAG and its tasks (for `make demo`).

Reads the Airflow metadata DB of `$AIRFLOW_HOME`; prints one table per DAG with each task's state, try number,
duration and output folder. Exits 1 if a latest run failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.cli import print_table


def main(dag_ids: list[str]) -> int:
    from airflow.models.dagrun import DagRun  # heavy: loaded only when used
    from airflow.utils.session import create_session  # heavy: loaded only when used

    from operators.operators.ray_job import path_safe  # heavy: loads airflow

    root = Path(os.environ.get("SEARCHREL_ROOT") or Path.cwd() / "artifacts")
    failed = False
    with create_session() as session:
        for dag_id in dag_ids:
            found = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.run_after.desc()).first()
            if found is None:
                print(f"{dag_id}: no run yet")
                continue
            run_key = (found.conf or {}).get("run_key") or path_safe(found.run_id)
            pipeline = dag_id.split("_")[0]
            rows = []
            for ti in sorted(found.get_task_instances(session=session), key=lambda t: str(t.start_date or "~")):
                seconds = (ti.end_date - ti.start_date).total_seconds() if ti.start_date and ti.end_date else 0
                out = root / pipeline / run_key / ti.task_id
                rows.append({"task": ti.task_id, "state": str(ti.state), "tries": ti.try_number,
                             "seconds": round(seconds, 1), "output": str(out) if out.exists() else ""})
            print_table(f"{dag_id} / {found.run_id}: {found.state}", rows)
            failed |= str(found.state) == "failed"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
