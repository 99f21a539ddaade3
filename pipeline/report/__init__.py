"""The governance report stage: every governance question answered with evidence, one release decision, beside
the model. One module per job:

- `judge`: the report's own checks (validation, consent; memorization from pipeline.audit.memorization) beside the
  audits', and the release decision (pure);
- `evidence`: what the report states, typed, gathered before anything is rendered;
- `markdown`: report.md, the single source; `html`: report.html, the same text rendered into one offline file;
- `model_card`: model_card.md; `croissant`: each dataset's card as Croissant JSON-LD;
- `stage`: the stage itself: reads the hand-offs (pipeline.artifacts), writes reports/governance/ through a partial
  folder swapped in at the end, and records it all in the MLflow model registry (pipeline.registry).
"""
