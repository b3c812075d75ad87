"""Training records for `viral-train` from lmms-eval tasks' training splits.

``--data tasks:NAME[,NAME...]`` (with ``--include-path``) turns every training document of
those tasks into one LLaVA-format record: the task's own visual, prompt text
(doc_to_text) and target (doc_to_target; the chosen option for multiple-choice tasks), so a
model is fine-tuned on exactly the prompts it is evaluated with. The ShapeWorld tasks ship
a train split for this.
"""

from __future__ import annotations


def task_records(
    names: list[str], include_path: str | None = None, split: str = "train", limit: int | None = None
) -> list[dict]:
    """One record per training document. With ``include_path``, only the tasks found there
    are indexed (lmms-eval's own few thousand task files are skipped: much faster)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else TaskManager()
    tasks = _flatten(get_task_dict(names, manager))
    records = []
    for name, task in tasks.items():
        docs = _split_docs(task, split, name)
        for i, doc in enumerate(docs):
            if limit is not None and i >= limit:
                break
            visuals = task.doc_to_visual(doc) or []
            if len(visuals) > 1:
                raise ValueError(
                    f"task {name}: document {i} has {len(visuals)} visuals; viral-train takes one image per record"
                )
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
                target = task.doc_to_choice(doc)[target]
            if isinstance(target, list):
                target = target[0]
            records.append(
                {
                    "image": visuals[0] if visuals else None,
                    "task": name,
                    "conversations": [
                        {"from": "human", "value": str(task.doc_to_text(doc))},
                        {"from": "gpt", "value": str(target).strip()},
                    ],
                }
            )
    if not records:
        raise ValueError(f"tasks {names}: no {split} documents")
    return records


def _flatten(task_dict) -> dict:
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(_flatten(value))
        else:
            out[getattr(key, "group_name", key) if not isinstance(key, str) else key] = value
    return out


def _split_docs(task, split: str, name: str):
    cfg = task.config
    split_name = {"train": cfg.training_split, "validation": cfg.validation_split, "test": cfg.test_split}.get(
        split, split
    )
    if not split_name or split_name not in task.dataset:
        raise ValueError(
            f"task {name} has no {split} split (training_split in its YAML); available: {list(task.dataset)}"
        )
    return task.dataset[split_name]
