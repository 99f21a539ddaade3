"""Human sign-off: the gate proposes (eligible / blocked), a named reviewer disposes, bound by signature to exactly
what was reviewed. One module per job:

- `reviewers`: who may sign (governance/reviewers.yaml: public keys and roles) and the reviewers' keys;
- `signoff`: the signed record, an in-toto Statement in a DSSE envelope signed with Ed25519, and the digests of
  what it names (the report files with their sign-off block left out, model files, data, params, git commit);
- `verify`: what the recorded sign-offs add up to against today's files, keys, waivers and withdrawals (pure);
- `store`: the sign-offs in the MLflow registry (artifacts, version tags, alias `approved`) and in the report.
"""
