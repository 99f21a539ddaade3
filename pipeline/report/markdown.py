"""report.md, the single source of the governance report (report.html is it rendered). Every value from a card
or a metadata file passes through `text()` or `code()` (pipeline.render)."""

from __future__ import annotations

from pipeline.artifacts import BIAS, INGESTED, QUARANTINE, SHIFT, VALIDATION
from pipeline.contracts import Check, Review
from pipeline.policy import REASONS
from pipeline.presets import POOL_NAMES
from pipeline.render import (
    checks_table,
    code,
    corruption_sentence,
    evidence_table,
    figure,
    fmt,
    inconclusive_list,
    representation_table,
    table,
    text,
)
from pipeline.report.evidence import Evidence
from pipeline.report.regression import NOT_APPLICABLE
from pipeline.review.signoff import BLOCK_END, BLOCK_START

NOT_STATED = "not stated (a card of schema_version 1)"


def figures(evidence: Evidence, area: str) -> list[str]:
    return [line for name, caption in evidence.figures[area] for line in figure(f"figures/{name}", caption)]


def report_markdown(evidence: Evidence) -> str:
    """The whole report."""
    release, model = evidence.release, evidence.model
    checks = release.checks
    lines = [f"# Governance report: MAE encoder on {' + '.join(map(text, evidence.training_records))}", ""]
    lines += quality_statement(checks)
    lines += [f"## Release decision: {release.decision.upper()}", ""]
    policy = "; ".join(f"{status} blocks {', '.join(patterns)}" for status, patterns in release.policy.block_on.items()
                       if patterns)
    by_id = {c.id: c for c in checks}
    if release.blocked_by:
        lines += [f"Blocked by these checks ({policy}):", ""]
        lines += [f"- {code(c)}: {by_id[c].status}" + (f" ({text(by_id[c].reason)})" if by_id[c].reason else "")
                  for c in release.blocked_by] + [""]
    else:
        lines += [f"No check has a status that blocks it ({policy}).", ""]
    inconclusive = [c.id for c in checks if c.status == "inconclusive" and c.id not in release.blocked_by]
    if inconclusive:
        lines += ["Inconclusive and not blocking (the data could not decide either way; more evidence is needed, "
                  "not assumed): " + ", ".join(code(c) for c in inconclusive), ""]
    lines += table(["area", "status of blocking checks", "status of advisory checks"],
                   [[area, e.status, e.advisory or "—"] for area, e in release.areas.items()])
    lines += [f"Model: registered model `{model.registered_model}` version {model.version}, MLflow run "
              f"`{model.run_id}`, git commit `{model.git_commit}`" + (
                  f" (uncommitted changes: {text(model.git_changed_paths or 'paths not recorded')})"
                  if model.git_dirty == "true" else "")
              + ".", "", audited_sentence(evidence), "",
              "Every number below is a measurement on this model and this data. Model quality is the model against "
              "trivial baselines on the same unseen images (paired bootstrap), passed only when the whole interval "
              "shows it ahead. Disparities are signed "
              "differences against a named reference (a group, in-distribution images, training images), with "
              "bootstrap intervals at the confidence shown, adjusted (Bonferroni) where several groups are compared. "
              "A group check passes only when its whole interval lies within plus or minus the threshold "
              "(equivalence), fails only when it lies wholly beyond the threshold on the harmful side, and is "
              "inconclusive otherwise; domain, corruption and memorization checks are one-sided (non-inferiority). "
              "A bound within its Monte-Carlo error of the threshold is inconclusive rather than decided on "
              "resampling noise. Each decided check states what its decision catches at its sizes: the "
              "probability that it passes and that it fails if the true value were no gap, the tolerance, or "
              "twice the tolerance, and the images that would give an 80% pass at no gap and an 80% fail at "
              "twice the tolerance.", ""]
    lines += signoff_section(evidence.review)
    lines += changes_section(evidence)
    lines += ["## Release checks", ""]
    lines += checks_table(checks) + evidence_table(checks)
    for section in (quality_section, provenance_section, consent_section, validation_section, training_section,
                    evaluation_section, bias_section, shift_section, memorization_section, regression_section,
                    overtrust_section, uses_section):
        lines += section(evidence)
    return "\n".join(lines).rstrip() + "\n"


def quality_statement(checks: list[Check]) -> list[str]:
    """What a reviewer reads first when a model check failed or was inconclusive: the model does not beat trivial
    baselines, so nothing else the report says makes it worth releasing. Empty when every model check passed."""
    failed = [code(c.id) for c in checks if c.area == "model" and c.status == "fail"]
    unsettled = [code(c.id) for c in checks if c.area == "model" and c.status == "inconclusive"]
    if not failed and not unsettled:
        return []
    found = ([f"behind them (or short of the required margin) on {', '.join(failed)} (fail)"] if failed else []) + (
        [f"not shown ahead on {', '.join(unsettled)} (inconclusive)"] if unsettled else [])
    return [f"**The model does not beat trivial baselines on images it never saw**: {'; '.join(found)}. A model that "
            "does not beat predicting each patch's mean, an untrained encoder or raw pixels has learnt nothing worth "
            "releasing, whatever the other checks say (see Model quality).", ""]


def signoff_section(review: Review) -> list[str]:
    """The sign-off block: who signed, when, what they said and waived, or that nobody has (or need). It lies
    between two anchors, is rewritten in place by each sign-off and is left out of the digest a sign-off takes;
    every reviewer's word passes through `text()`, a comment being as hostile as a card."""
    lines = [BLOCK_START, "", "## Sign-off", ""]
    if not review.required:
        lines += ["**No human signed.** `report.require_signoff` is false: the alias `approved` follows the "
                  "automatic outcome alone (an eligible version is approved, a blocked one is not).", ""]
    else:
        approvals = sum(v.decision == "approve" and not v.problems for v in review.signoffs)
        lines += [f"**{review.state.upper()}**: {approvals}"
                  f" of {review.required_signoffs} required approvals. The gate proposes; only a signed sign-off "
                  "(`python -m pipeline review`) moves the alias `approved`.", ""]
    if review.signoffs:
        lines += table(["reviewer", "time (UTC)", "decision", "comment", "waivers", "holds"],
                       [[text(v.reviewer), text(v.time), v.decision, text(v.comment),
                         ", ".join(code(w.check) for w in v.waivers) or "—",
                         "yes" if not v.problems else "no: " + text("; ".join(v.problems))] for v in review.signoffs])
    waivers = [(v, w) for v in review.signoffs for w in v.waivers]
    if waivers:
        lines += ["Waivers (each bound to the check's evidence when granted; worse evidence or expiry voids it):", ""]
        lines += table(["check", "justification", "expires", "evidence when waived", "by"],
                       [[code(w.check), text(w.reason), w.expires, f"{w.status} {fmt(w.value)} {fmt(w.interval)}",
                         text(v.reviewer)] for v, w in waivers])
    if review.required and review.state != "approved" and review.problems:
        lines += ["Not approved because:", ""] + [f"- {text(p)}" for p in review.problems] + [""]
    return lines + [BLOCK_END, ""]


def changes_section(evidence: Evidence) -> list[str]:
    """The delta against the approved version, read before the checks: records, params, commits, statuses."""
    delta = evidence.changes
    lines = ['<a id="changes"></a>', "", "## Changes since the approved version", ""]
    if delta is None:
        return lines + ["No other version is under alias `approved`: there is nothing to compare with, and every "
                        "check below is read on its own.", ""]
    lines += [f"Against version {text(delta.approved_version)} (run `{text(delta.approved_run_id)}`), the version "
              "under alias `approved`. The regression checks (Compared with the approved model, below) decide "
              f"whether the candidate is worse: {', '.join(f'{n} {s}' for s, n in delta.regression.items()) or 'none'}"
              " ([details](#regression)).", ""]
    if delta.records is not None:
        lines += ["Training records, by record id (withdrawn: the removed records the withdrawals file lists):", ""]
        lines += table(["dataset", "approved", "candidate", "added", "removed", "of which withdrawn"],
                       [[text(r.dataset), r.approved, r.candidate, r.added, r.removed, r.removed_withdrawn]
                        for r in delta.records])
    if delta.params is not None:
        lines += ([f"Params changed ({len(delta.params)}):", ""]
                  + table(["key", "approved", "candidate"],
                          [[code(p.key), code(p.approved or "absent"), code(p.candidate or "absent")]
                           for p in delta.params]) if delta.params else ["Params: unchanged.", ""])
    if delta.commits is not None:
        older, newer = (c[:12] for c in delta.commits_between)
        lines += ([f"Commits from `{older}` to `{newer}` ({len(delta.commits)}):", ""]
                  + [f"- {text(c)}" for c in delta.commits] + [""] if delta.commits else
                  [f"Code: the same commit (`{newer}`).", ""])
    if delta.statuses:
        lines += [f"Checks whose status changed ({len(delta.statuses)}):", ""]
        lines += table(["check", "approved", "candidate"],
                       [[code(c.check), c.approved or "absent", c.candidate or "absent"] for c in delta.statuses])
    else:
        lines += ["No check changed status.", ""]
    if delta.missing:
        lines += ["Not compared, because the approved version did not record it: "
                  + "; ".join(text(m) for m in delta.missing) + ".", ""]
    return lines


def audited_sentence(evidence: Evidence) -> str:
    """Which trained-on data the evaluation and audits cover, and which they do not, so a gap is seen, not missed."""
    audited = text(evidence.model.dataset)
    sentence = (f"Trained on {', '.join(map(text, evidence.training_records))}. Evaluation, bias, shift and "
                f"memorization judge {audited} alone (its val, test and held-out splits)")
    if not evidence.not_audited:
        return sentence + "."
    return (sentence + f". **Trained on but not audited: {', '.join(map(text, evidence.not_audited))}**: no "
            "evaluation, bias, shift or memorization check below covers their images; consent is checked for "
            "every dataset.")


def quality_section(evidence: Evidence) -> list[str]:
    lines = ['<a id="model-quality"></a>', "", "## Model quality", "",
             "The model against trivial baselines on the images it never saw (val and test), image by image on the "
             "same images: its hidden-pixel error against predicting each hidden patch's own mean (same masks), and "
             "where there are labels its probe and kNN against the same classifiers on an untrained encoder's "
             "features and on raw pixels (a seeded sample of each split, so those pairs are that sample's images). "
             "A check passes only when its whole interval shows the model ahead by at least "
             "`report.min_margin_over_baselines` (0: ahead at all), and fails when it shows it behind (or short of "
             "that margin).", ""]
    checks = evidence.checks("model")
    idle = [f"- {code(c.id)}: {text(c.reason)}" for c in checks if c.status == "not_applicable"]
    return lines + checks_table(checks) + inconclusive_list(checks) + (["Not applicable:", ""] + idle + [""]
                                                                       if idle else [])


def provenance_section(evidence: Evidence) -> list[str]:
    lines = ["## Provenance", ""]
    rows = []
    for name, item in evidence.datasets.items():
        card, counts = item.card, item.counts
        timeframe = card.provenance.timeframe
        rows.append([text(name), text(card.version), text(card.source.uri or card.source.kind),
                     text(card.license.spdx), text("; ".join(card.provenance.creators)),
                     f"{timeframe.start} to {timeframe.end}", counts.read, counts.accepted, counts.quarantined])
    lines += table(["dataset", "card version", "source", "licence", "creators", "timeframe", "read", "accepted",
                    "quarantined"], rows)
    lines += ["Collection method per dataset:", ""]
    lines += [f"- **{text(name)}**: {text(item.card.provenance.collection_method)}"
              for name, item in evidence.datasets.items()] + [""]
    for name, item in evidence.datasets.items():
        prov = item.card.provenance
        lines += [f"Data governance of **{text(name)}**:", ""]
        lines += table(["what", "as the card states it"], [
            ["original purpose of collection", text(prov.purpose or NOT_STATED)],
            ["what the data is assumed to represent", text(prov.represents or NOT_STATED)],
            ["data preparation applied", "; ".join(map(text, prov.preparation)) if prov.preparation
             else text(NOT_STATED)]])
    rows = [[text(name), reason, text(REASONS.get(reason, "")), n] for name, item in evidence.datasets.items()
            for reason, n in sorted(item.counts.by_reason.items())]
    lines += [f"Quarantined records by reason (each is kept in `{INGESTED}/<dataset>/{QUARANTINE}`):", ""]
    lines += table(["dataset", "reason", "meaning", "records"], rows) if rows else ["None quarantined.", ""]
    return lines


def consent_section(evidence: Evidence) -> list[str]:
    lines = ['<a id="consent"></a>', "", "## Consent", ""]
    rows = []
    for name, item in evidence.datasets.items():
        consent, by_reason = item.card.consent, item.counts.by_reason
        rows.append([text(name), consent.basis, consent.training_permission, by_reason.get("consent_withdrawn", 0),
                     by_reason.get("withdrawal_request", 0),
                     sum(n for r, n in by_reason.items() if r.startswith("consent") or r == "training_not_permitted"),
                     text(consent.withdrawal)])
    lines += table(["dataset", "basis", "training permission", "withdrawn by subjects", "excluded on request "
                    "(withdrawals file)", "excluded for consent in all", "how to withdraw"], rows)
    undocumented = [n for n, item in evidence.datasets.items() if item.card.consent.basis == "undocumented"]
    if undocumented:
        lines += [f"Subjects' consent is undocumented for: {', '.join(map(text, undocumented))}. The policy "
                  + ("accepts such datasets (policy.accept_undocumented_consent); a reviewer should weigh that."
                     if evidence.policy.accept_undocumented_consent
                     else "refuses such datasets: their records are quarantined."), ""]
    else:
        lines += ["Every dataset documents its subjects' consent.", ""]
    lines += [f"Withdrawals file `{evidence.policy.withdrawals_file}`: {evidence.withdrawals} entries. "
              "The model was trained on the records below; their ids are logged with the model "
              "(`governance/training_records.csv`, with each record's dataset) so that `python -m pipeline "
              "consent-check` finds every model version a later withdrawal touches, in any of these datasets.", ""]
    if evidence.withdrawn_versions:
        lines += [f"Registered versions of {text(evidence.model.registered_model)} trained on records the withdrawals "
                  "file now lists (tagged `consent.status` = withdrawn_records in the registry; retire them):", ""]
        lines += table(["version", "run", "withdrawn records it trained on"],
                       [[v.version, text(v.run_id), f"{len(v.records)}: {text(', '.join(v.records[:5]))}"
                         + (", …" if len(v.records) > 5 else "")] for v in evidence.withdrawn_versions])
        lines += [""]
    elif evidence.withdrawals:
        lines += ["No other registered version was trained on a record the withdrawals file lists.", ""]
    lines += table(["trained on", "training records", "licence", "consent basis", "training permission"],
                   [[text(name), count, text(evidence.datasets[name].card.license.spdx),
                     evidence.datasets[name].card.consent.basis,
                     evidence.datasets[name].card.consent.training_permission]
                    for name, count in evidence.training_records.items()])
    return lines


def validation_section(evidence: Evidence) -> list[str]:
    summary = evidence.validation
    lines = ["## Data validation", "", f"Great Expectations validation {'passed' if summary.passed else 'FAILED'}: "
             f"{summary.failed_critical} critical and {summary.failed_warning} warning expectations failed. "
             f"Data Docs: `{VALIDATION}/index.html`.", ""]
    lines += table(["dataset", "expectations", "failed", "critical", "warning"],
                   [[text(n), d.evaluated, d.failed, d.failed_critical, d.failed_warning]
                    for n, d in summary.datasets.items()])
    if evidence.validation_failures:
        lines += ["Failed expectations:", ""] + [f"- {text(line)}" for line in evidence.validation_failures] + [""]
    return lines


def training_section(evidence: Evidence) -> list[str]:
    model, metrics = evidence.model, evidence.pretrain
    arch = model.architecture
    lines = ["## Training", ""]
    lines += table(["what", "value"], [
        ["architecture", f"MAE ViT preset `{model.preset}`: {arch['img_size']} px images, patch {arch['patch_size']}, "
                         f"encoder {arch['depth']} x {arch['embed_dim']}, decoder {arch['decoder_depth']} x "
                         f"{arch['decoder_embed_dim']}, mask ratio {model.mask_ratio}"],
        ["feature", f"{POOL_NAMES[model.pool]} (`{model.pool}`): what the logged encoder returns, and what the probe, "
                    "kNN, drift and corruption checks judged"],
        ["trained on", "; ".join(f"{text(d.name)}: {d.train_images} training images, weight {d.weight:g}, "
                                 f"{d.samples_per_epoch} samples per epoch" for d in model.trained_on)],
        ["evaluated and audited", f"{text(model.dataset)}"
                                  + (f" (trained on but not audited: {', '.join(map(text, evidence.not_audited))})"
                                     if evidence.not_audited else "")],
        ["epochs / steps", f"{metrics.epochs} / {metrics.steps}"],
        ["validation masked-patch loss", f"{metrics.val_masked_loss:.4f} against {metrics.val_patch_mean_baseline:.4f} "
                                         "for predicting each patch's mean"],
        ["MLflow run", f"`{model.run_id}` (experiment {model.experiment_id})"],
        ["logged encoder", f"`{model.model_uri}`"],
        ["registered", f"`{model.registered_model}` version {model.version}"],
        ["git commit", f"`{model.git_commit}`, uncommitted changes: {model.git_dirty}"],
    ])
    lines += ["Data versions (DVC md5 of each training input, as tagged on the run):", ""]
    lines += table(["input", "md5"], [[code(k), code(v)] for k, v in evidence.data_hashes.items()])
    return lines


def evaluation_section(evidence: Evidence) -> list[str]:
    metrics = evidence.evaluation
    lines = ["## Evaluation", "", f"Hidden-pixel reconstruction error (MSE in [0, 1]) at mask ratio "
             f"{metrics.mask_ratio}, on masks fixed by a seed, against a randomly initialised model of the same "
             "architecture and a predictor of each patch's mean:", ""]
    lines += table(["split", "images", "MSE", "PSNR (dB)", "random init MSE", "patch mean MSE"],
                   [[s, r.count, fmt(r.mse), fmt(r.psnr, 2), fmt(r.mse_random_init), fmt(r.mse_patch_mean)]
                    for s, r in metrics.reconstruction.items()])
    for entry, title in ((metrics.probe, "Linear probe"), (metrics.knn, "kNN")):
        if not entry.available:
            lines += [f"{title}: not run ({text(entry.reason or 'no labels')}).", ""]
            continue
        lines += [f"{title} top-1 accuracy on frozen features (margin over random init "
                  f"{fmt(entry.margin_over_random_init, 3)}, over raw pixels {fmt(entry.margin_over_raw_pixels, 3)}"
                  " on test):", ""]
        lines += table(["split", "MAE", "random init", "raw pixels"],
                       [[s, fmt(v.get("mae"), 3), fmt(v.get("random_init"), 3), fmt(v.get("raw_pixels"), 3)]
                        for s, v in entry.splits().items()])
    raw = metrics.raw_pixels
    if raw is not None and metrics.probe.available:
        lines += [f"Raw pixels are a seeded sample of at most {raw.max_images:,} images per split ("
                  + ", ".join(f"{split} {count:,}" for split, count in raw.images.items())
                  + f"), each averaged to {raw.size} x {raw.size} pixels; the MAE and random-init features cover "
                  "every image.", ""]
    return lines + figures(evidence, "eval")


def bias_section(evidence: Evidence) -> list[str]:
    lines = ["## Bias", "", f"Audit status: **{evidence.bias.status}**. Full report: `{BIAS}/bias.md`.", ""]
    lines += checks_table(evidence.checks("bias"))
    lines += ["Representation in the training data against the card's population shares:", ""]
    return lines + representation_table(evidence.bias) + figures(evidence, "bias")


def shift_section(evidence: Evidence) -> list[str]:
    lines = ["## Domain shift", "", f"Audit status: **{evidence.shift.status}**. Full report: "
             f"`{SHIFT}/shift.md`.", ""]
    lines += checks_table(evidence.checks("shift"))
    corruption = next((c for c in evidence.checks("shift") if c.id == "shift.corruptions"), None)
    if corruption is not None:
        lines += [corruption_sentence(evidence.shift.corruptions, corruption), ""]
    return lines + figures(evidence, "shift")


def memorization_section(evidence: Evidence) -> list[str]:
    lines = ['<a id="memorization"></a>', "", "## Memorization", "",
             "Reconstruction error on training images against images the model never saw (val and test). An unseen "
             "error well above the training error means the model reproduces what it was shown: a privacy risk for "
             "the people in the training data.", ""]
    lines += table(["images", "training n", "unseen n", "training MSE", "unseen MSE", "relative gap", "interval",
                    "status"],
                   [[text(name), e.train_count, e.unseen_count, fmt(e.train_mse), fmt(e.unseen_mse), fmt(e.value),
                     fmt(e.interval), e.note or e.status] for name, e in evidence.memorization.items()])
    return lines


def regression_section(evidence: Evidence) -> list[str]:
    lines = ['<a id="regression"></a>', "", "## Compared with the approved model", ""]
    checks = evidence.checks("regression")
    if evidence.approved is None or all(c.id == NOT_APPLICABLE for c in checks):
        reason = next((c.reason for c in checks if c.reason), "no approved version")
        return lines + [f"Not applicable: {text(reason)}.", ""]
    lines += [f"The candidate against `{evidence.model.registered_model}` {text(evidence.approved)}, the version "
              "under alias `approved`. Reconstruction error and classifier accuracy are compared on the unseen "
              "records both models evaluated (paired bootstrap); bias, shift and memorization checks by the growth "
              "of their harm, with the difference of the two checks' intervals. Thresholds: "
              "`report.max_regression`; an improvement is no harm.", ""]
    return lines + checks_table(checks)


def overtrust_section(evidence: Evidence) -> list[str]:
    lines = ["## Overtrust", "", "A reconstruction looks convincing whether or not it is right: the model fills "
             "hidden patches with plausible texture, not with what was there. Read the error printed with each image, "
             "not the picture; at high mask ratios the reconstruction is a guess. Do not use reconstructions as "
             "evidence of what an image contained.", ""]
    return lines + figures(evidence, "overtrust")


def uses_section(evidence: Evidence) -> list[str]:
    lines = ["## Intended and out-of-scope uses", ""]
    for name, item in evidence.datasets.items():
        card = item.card
        lines += [f"### {text(name)}", "", "Intended:", ""] + [f"- {text(u)}" for u in card.uses.intended]
        lines += ["", "Out of scope:", ""] + [f"- {text(u)}" for u in card.uses.out_of_scope]
        lines += ["", "Known limitations:", ""] + [f"- {text(u)}" for u in card.known_limitations]
        lines += ["", "Known biases:", ""] + [f"- {text(u)}" for u in card.known_biases] + [""]
    return lines
