"""Evaluation: accuracy per language through lm-evaluation-harness, for harness tasks and local Global-MMLU / M3KE
files.

- [`sources`]: what is evaluated, one harness task or local file per language ([`parse_sources`]).
- [`local_files`]: local multiple-choice files in the Global-MMLU and M3KE schemas, validated row by row.
- [`tasks`]: the harness's tasks: local files written as tasks ([`write_local_tasks`]), names checked early.
- [`scores`]: the accuracy per language read from the harness's per-item samples ([`scores_from_results`]).
- [`run`]: a model evaluated ([`evaluate_model`]), or loaded, evaluated and reported ([`evaluate_and_report`]).
- [`report`]: the tables, the chart and the files of the report ([`write_eval_report`]).
"""
