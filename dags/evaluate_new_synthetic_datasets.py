"""Value every new synthetic dataset without anyone pressing a button, and rank it against all before it.

Runs on a schedule (cron from the setting `SYNTHVAL_DISCOVERY_CRON`, default hourly) **and** whenever a
producer announces a dataset with an event on the Asset `x-synthval://synthetic-datasets/announced`
whose `extra` holds `{"dataset_uri": "gs://..."}` (several: `"dataset_uris": [...]`). Each run:

1. `fetch_real`: the real dataset, to a folder that is the same for every run, so every run scores on
   the very same test images (the evaluation protocol);
2. `discover`: lists `watch_root` (a local folder or gs:// prefix) and the announced datasets for
   dataset folders that are **complete** (their `marker` exists: `_SUCCESS` by default, which
   `synthval generate` writes last) and have **no result yet** for this recipe on the current
   benchmark (the test set's content and the scoring rules); half-written datasets are left for a later
   run. It also names the real-only budgets of the real-only learning curve that this benchmark still
   lacks (computed once, then reused); `real_budgets` larger than the `real_split` of the real dataset
   are clipped to its size, with a warning in discover's log;
3. `value_dataset` (mapped, one per new dataset): train on the dataset, evaluate on the real test
   split, publish (real budget 0); with `budget_sweep`, `sweep` (mapped, one per dataset and budget)
   fine-tunes that model on each real budget, evaluates and publishes;
4. `real_curve` (mapped, one per missing budget): trains real-only models for the learning curve;
5. `leaderboard` prints the board (real-image equivalent first) and `announce_results` emits one Asset
   event per valued dataset through the alias `synthval_results`, its headline metrics in `extra`;
6. `check_valuations` fails the run if any valuation failed (the board and the events above still
   record every dataset that was valued), so a run is green only when every step of it was.

Every step is a `synthval` command from the recipe task factory; results land in the results store
(env `SYNTHVAL_RESULTS_DB_URL`; on a pod backend the Secret `SYNTHVAL_RESULTS_DB_SECRET` names;
default `<output_root>/results.db` on the local backend), which the *Synthval leaderboard* page of the
Airflow UI shows. Trainings, fine-tunings and evaluations take a slot of the Airflow Pool
`synthval_training` (create it with 2 slots where Airflow is set up: `airflow pools set
synthval_training 2 "synthval GPU steps"`; the compose stack does), so however many runs and datasets
there are, at most that many run at once and a burst of new datasets cannot starve the cluster.

```
airflow dags trigger evaluate_new_synthetic_datasets --conf '{"watch_root": "gs://bucket/synthetic"}'
airflow dags trigger evaluate_new_synthetic_datasets \\
    --conf '{"datasets": ["gs://bucket/synthetic/run-42"], "budget_sweep": true}'
```
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from airflow.sdk import Asset, AssetAlias, AssetOrTimeSchedule, CronTriggerTimetable, Param, task, task_group

from synthval_argv import Computed, Flag, ParamFlag
from synthval_macros import MACROS, run_slug
from synthval_params import (
    URI_PATTERN,
    compute_params,
    dataset_param,
    output_params,
    real_split_params,
    synthval_dag,
    test_split_param,
    training_params,
)
from synthval_settings import load_settings
from synthval_steps import REAL_DATA, evaluate_step, publish_step, train_step
from synthval_tasks import synthval_task

DAG_ID = "evaluate_new_synthetic_datasets"
settings = load_settings()
CRON = os.environ.get("SYNTHVAL_DISCOVERY_CRON", "").strip() or "0 * * * *"
# Bounds the GPU steps of every run of this DAG together; created with POOL_SLOTS slots where Airflow is set up.
POOL, POOL_SLOTS = "synthval_training", 2
WATCH_ROOT = os.environ.get("SYNTHVAL_WATCH_ROOT", "").strip() or f"{settings.data_root}/incoming"
# A producer announces a finished dataset with an event here (extra: {"dataset_uri": ...}). The "x-" scheme is
# Airflow's for URIs no provider handles: any other unknown scheme makes Airflow load every provider's URI
# handlers to look for one (2 CPU-seconds per parse, the Google provider's GCS hook among them).
ANNOUNCED = Asset(uri="x-synthval://synthetic-datasets/announced", name="synthval_synthetic_dataset_announced")
# Each valued dataset's result asset is emitted through this alias; other DAGs schedule on it.
RESULTS_ALIAS = AssetAlias("synthval_results")
HEADLINE = ("mAP", "mAP50", "mAR100", "real_equiv", "real_equiv_low", "real_equiv_high")


REAL_ROLE = Flag("--dataset", "real={{ params.real_dataset }}")


def budget_split(budget: Any) -> tuple[Any, ...]:
    """The training split flags of a real budget: `budget` images of the real training split."""
    return (Flag("--train-split", "{{ params.real_split }}"), Flag("--max-images", budget))


def result_asset(dataset_uri: str) -> Asset:
    """The result asset of one dataset, stable per dataset URI."""
    digest = slug(dataset_uri)
    return Asset(uri=f"x-synthval://results/{digest}", name=f"synthval_result_{digest}")


def slug(text: str) -> str:
    """A short stable folder name for a URI."""
    return hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:16]


def _pass_context(fn):
    import jinja2

    return jinja2.pass_context(fn)


def announced_flags(context: Any) -> list[str]:
    """`--dataset=URI` for each dataset the `datasets` param and the triggering Asset events name."""
    uris = list(context["params"].get("datasets") or [])
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            extra = event.extra or {}
            uris += [extra["dataset_uri"]] if extra.get("dataset_uri") else []
            uris += list(extra.get("dataset_uris") or [])
    return [f"--dataset={uri}" for uri in dict.fromkeys(uris)]


def budget_flags(context: Any) -> list[str]:
    """discover's budgets: 0 (and the sweep's) per dataset, the real-only curve's always."""
    params = context["params"]
    sweep = list(params["real_budgets"]) if params["budget_sweep"] else []
    return ["--budget=0", *[f"--budget={b}" for b in sweep], *[f"--real-budget={b}" for b in params["real_budgets"]]]


@_pass_context
def mapped_upstream(context: Any, task_id: str, key: str) -> Any:
    """`key` of what `task_id` pushed at this task's own map index (a task of the same mapped group)."""
    ti = context["ti"]
    result = ti.xcom_pull(task_ids=task_id, map_indexes=ti.map_index)
    if not isinstance(result, dict) or result.get(key) in (None, ""):
        raise KeyError(f"upstream task {task_id!r} [{ti.map_index}] pushed no {key!r} in its XCom (got {result!r})")
    return result[key]


def work_items(run_root: str, kind: str, names: list[Any]) -> list[dict[str, str]]:
    """Output URIs per mapped job: `<run root>/<kind>/<name>/{checkpoints,tensorboard,eval}/...`."""
    items = []
    for name in names:
        work = f"{run_root}/{kind}/{slug(str(name))}"
        items.append({"checkpoint_dir": f"{work}/checkpoints/train", "train_tb": f"{work}/tensorboard/train",
                      "eval_out": f"{work}/eval/test", "eval_tb": f"{work}/tensorboard/evaluate"})
    return items


with synthval_dag(
    dag_id=DAG_ID,
    doc_md=__doc__,
    description=__doc__.strip().splitlines()[0],
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(CRON, timezone="UTC"), assets=[ANNOUNCED]),
    catchup=False,
    max_active_runs=1,  # two runs at once would both pick the same new datasets
    params={
        "watch_root": Param(
            WATCH_ROOT, type=["null", "string"], pattern=URI_PATTERN, section="Discovery", title="Watched root",
            description="Local folder or gs:// prefix whose sub-folders are synthetic datasets (empty: only "
            "the announced ones).",
        ),
        "marker": Param(
            "_SUCCESS", type="string", pattern=r"^[^\x00-\x1f\x7f/][^\x00-\x1f\x7f]*$", section="Discovery",
            title="Completion marker",
            description="File (path relative to a dataset, or a glob) that exists only once the dataset is "
            "complete: _SUCCESS (synthval generate), or the file your Perception run writes last.",
        ),
        "datasets": Param(
            [], type=["array", "null"], items={"type": "string", "pattern": URI_PATTERN}, section="Discovery",
            title="Announced datasets", description="Dataset URIs to value now (checked for the marker too).",
        ),
        "max_datasets": Param(20, type="integer", minimum=1, section="Discovery", title="Datasets per run",
                              description="Value at most this many new datasets per run; the rest wait."),
        "real_dataset": dataset_param("real", settings.default_real),
        "real_split": real_split_params()["real_split"],
        **test_split_param(),
        "budget_sweep": Param(False, type="boolean", section="Real budgets", title="Budget sweep",
                              description="Also fine-tune each dataset's model on every real budget."),
        "real_budgets": Param(
            [76, 380, 760], type="array", items={"type": "integer", "minimum": 1}, minItems=1,
            section="Real budgets", title="Real budgets",
            description="Real image counts of the real-only learning curve (and of the sweep); counts above the "
            "size of the real split are clipped to it (discover logs a warning).",
        ),
        **training_params(finetune=True),
        **output_params(),
        **compute_params(),
    },
    tags=["synthval", "discovery", "leaderboard"],
    user_defined_macros={**MACROS, "mapped_upstream": mapped_upstream, "slug": slug},
    default_args={"owner": "synthval"},
) as dag:
    results_flags = [Flag("--results", "{{ params.output_root }}/results")]
    bounded = {"pool": POOL}

    fetch_real = synthval_task("fetch", [
        "synthval", "fetch",
        # One folder for every run: every run scores the same test images (the protocol stays the same).
        Flag("--out", "{{ params.output_root }}/" + DAG_ID + "/real/{{ slug(params.real_dataset) }}"),
        "--", "{{ params.real_dataset }}",
    ], task_id="fetch_real")

    discover = synthval_task("discover", [
        "synthval", "discover",
        ParamFlag("--root", "watch_root"),
        Computed(announced_flags),
        Flag("--marker", "{{ params.marker }}"),
        Flag("--recipe", "{{ dag.dag_id }}"),
        Flag("--test-data", REAL_DATA),
        Flag("--split", "{{ params.test_split }}"),
        Flag("--real-dataset", "{{ params.real_dataset }}"),
        Computed(budget_flags),
        Flag("--real-split", "{{ params.real_split }}"),
        Flag("--limit", "{{ params.max_datasets }}"),
        *results_flags,
    ])

    @task
    def plan_datasets(found: dict, params=None, run_id=None) -> list[dict]:
        """One job per new dataset: the dataset and where its outputs go."""
        root = f"{params['output_root']}/{DAG_ID}/{run_slug(run_id)}"
        names = found["new_datasets"]
        return [{"dataset": uri, "dataset_flag": f"synthetic={uri}", **item}
                for uri, item in zip(names, work_items(root, "datasets", names), strict=True)]

    @task
    def plan_real_curve(found: dict, params=None, run_id=None) -> list[dict]:
        """One job per real budget the real-only curve of this protocol still lacks."""
        root = f"{params['output_root']}/{DAG_ID}/{run_slug(run_id)}"
        budgets = found["missing_real_budgets"]
        return [{"budget": b, **item} for b, item in zip(budgets, work_items(root, "real-only", budgets), strict=True)]

    @task_group
    def value_dataset(dataset, dataset_flag, checkpoint_dir, train_tb, eval_out, eval_tb):
        """Train on one synthetic dataset, evaluate on the real test split, publish (real budget 0)."""
        checkpoint = "{{ mapped_upstream('value_dataset.train', 'checkpoint_uri') }}"
        train = train_step("train", dataset, checkpoint_dir=checkpoint_dir, tb_log_dir=train_tb, **bounded)
        evaluate = evaluate_step(checkpoint, out=eval_out, tb_log_dir=eval_tb, **bounded)
        publish = publish_step(checkpoint, datasets=(Flag("--dataset", dataset_flag), REAL_ROLE),
                               budget=(Flag("--real-budget", 0),),
                               metrics="{{ mapped_upstream('value_dataset.evaluate', 'metrics_uri') }}")
        train >> evaluate >> publish

    @task(trigger_rule="all_done")  # one dataset's failed training must not hold up the others' sweep
    def plan_sweep(datasets: list[dict], found: dict, params=None, ti=None) -> list[dict]:
        """One fine-tuning job per (valued dataset, real budget), from that dataset's synthetic checkpoint."""
        if not params["budget_sweep"]:
            return []
        # One entry per map index, None where that training failed.
        trained = ti.xcom_pull(task_ids="value_dataset.train", map_indexes=list(range(len(datasets)))) or []
        jobs = []
        for item, result in zip(datasets, trained, strict=True):
            if not result:  # its training failed: nothing to fine-tune
                continue
            for budget in found["real_budgets"]:  # as discover clipped them to the real split
                work = item["checkpoint_dir"].rsplit("/checkpoints/", 1)[0] + f"/budget-{budget}"
                jobs.append({"dataset_flag": item["dataset_flag"], "budget": budget, "init": result["checkpoint_uri"],
                             "checkpoint_dir": f"{work}/checkpoints/finetune", "train_tb": f"{work}/tensorboard/finetune",
                             "eval_out": f"{work}/eval/test", "eval_tb": f"{work}/tensorboard/evaluate"})
        return jobs

    @task_group
    def sweep(dataset_flag, budget, init, checkpoint_dir, train_tb, eval_out, eval_tb):
        """Fine-tune one dataset's model on a real budget, evaluate, publish at that budget."""
        checkpoint = "{{ mapped_upstream('sweep.finetune', 'checkpoint_uri') }}"
        finetune = train_step("finetune", REAL_DATA, split_flags=budget_split(budget), init_checkpoint=init,
                              checkpoint_dir=checkpoint_dir, tb_log_dir=train_tb, **bounded)
        evaluate = evaluate_step(checkpoint, out=eval_out, tb_log_dir=eval_tb, **bounded)
        publish = publish_step(checkpoint, datasets=(Flag("--dataset", dataset_flag), REAL_ROLE),
                               budget=(Flag("--real-budget", budget),),
                               metrics="{{ mapped_upstream('sweep.evaluate', 'metrics_uri') }}")
        finetune >> evaluate >> publish

    @task_group
    def real_curve(budget, checkpoint_dir, train_tb, eval_out, eval_tb):
        """A real-only model on `budget` real images: one point of the protocol's learning curve."""
        checkpoint = "{{ mapped_upstream('real_curve.train', 'checkpoint_uri') }}"
        train = train_step("train", REAL_DATA, split_flags=budget_split(budget), checkpoint_dir=checkpoint_dir,
                           tb_log_dir=train_tb, **bounded)
        evaluate = evaluate_step(checkpoint, out=eval_out, tb_log_dir=eval_tb, **bounded)
        publish = publish_step(checkpoint, datasets=(REAL_ROLE,), budget=(Flag("--real-budget", budget),),
                               metrics="{{ mapped_upstream('real_curve.evaluate', 'metrics_uri') }}")
        train >> evaluate >> publish

    leaderboard = synthval_task("leaderboard", [
        "synthval", "leaderboard", *results_flags, Flag("--recipe", "{{ dag.dag_id }}"), "--format=json",
        Flag("--out", "{{ run_root() }}/leaderboard.json"),
    ], trigger_rule="all_done")

    @task(outlets=[RESULTS_ALIAS], trigger_rule="all_done")
    def announce_results(board: dict, found: dict, *, outlet_events=None, run_id=None) -> list[str]:
        """One Asset event per dataset valued in this run, its headline metrics (budget 0) in `extra`."""
        import json

        from airflow.sdk import ObjectStoragePath

        uri = board["leaderboard_uri"]
        entries = json.loads(ObjectStoragePath(uri if "://" in uri else f"file://{uri}").read_text())
        announced = []
        for dataset in found["new_datasets"]:
            mine = [e for e in entries if e["dataset"] == dataset and e["run_id"] == run_id]
            head = next((e for e in mine if e["real_budget"] == 0), None)
            if head is None:  # its evaluation failed: nothing to announce
                continue
            extra = {"dataset_uri": dataset, "protocol": head["protocol"], "result_uri": head["link"],
                     **{k: head[k] for k in HEADLINE},
                     "by_budget": {str(e["real_budget"]): e["mAP"] for e in mine}}
            outlet_events[RESULTS_ALIAS].add(result_asset(dataset), extra=extra)
            announced.append(dataset)
        return announced

    datasets = plan_datasets(discover.output)
    valued = value_dataset.expand_kwargs(datasets)
    sweep_jobs = plan_sweep(datasets, discover.output)
    swept = sweep.expand_kwargs(sweep_jobs)
    curve = real_curve.expand_kwargs(plan_real_curve(discover.output))
    fetch_real >> discover
    valued >> sweep_jobs
    [valued, swept, curve] >> leaderboard
    announce_results(leaderboard.output, discover.output)

    @task(trigger_rule="one_failed", retries=0)
    def check_valuations() -> None:
        """Fail the run when any of its tasks failed: the last tasks run whatever happened (all_done), so
        without this a run whose valuations failed would end green."""
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("a task of this run failed (see the failed tasks in the grid); the datasets "
                                   "valued by the others are on the leaderboard")

    watcher = check_valuations().operator
    for other in dag.tasks:
        if other is not watcher:
            other >> watcher
