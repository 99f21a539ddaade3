"""model_card.md: Mitchell et al.'s sections under Hugging Face model-card front matter, every number taken from
the checks the release decided."""

from __future__ import annotations

from pipeline.presets import POOL_NAMES
from pipeline.render import checks_table, code, evidence_table, text
from pipeline.report.evidence import Evidence
from pipeline.report.markdown import quality_statement, signoff_section


def model_card(evidence: Evidence) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    model, release = evidence.model, evidence.release
    trained = evidence.trained_card  # the evaluated and audited dataset's card
    cards = {name: evidence.datasets[name].card for name in evidence.training_records}
    licences = {card.license.spdx for card in cards.values()}
    names = ", ".join(map(text, cards))
    data = ModelCardData(license=licences.pop().lower() if len(licences) == 1 else "other", library_name="pytorch",
                         pipeline_tag="image-feature-extraction", datasets=list(cards),
                         tags=["masked-autoencoder", "vit", "governance-audited", f"release-{release.decision}"],
                         model_name=model.registered_model)
    lines = [f"# {model.registered_model} (version {model.version})", ""] + quality_statement(release.checks) + [
             f"**Automated outcome: {release.decision.upper()}.** The governance report "
             "(`report.html`, `report.md`) and `release.json` are logged beside this model.", "",
             *signoff_section(evidence.review),
             "## Model details", "",
             f"A Masked Autoencoder (He et al., 2021) ViT encoder, preset `{model.preset}`, pretrained on "
             f"{names} by hiding {model.mask_ratio:.0%} of each image's patches and reconstructing "
             f"them. The encoder returns {POOL_NAMES[model.pool]} (`{model.pool}`) per image, the feature every "
             f"audit below judged. MLflow run `{model.run_id}`, git commit `{model.git_commit}`, logged model "
             f"`{model.model_uri}`.",
             "", "## Intended use", ""]
    lines += [f"- {text(u)}" for u in trained.uses.intended]
    lines += ["", "Out of scope:", ""] + [f"- {text(u)}" for u in trained.uses.out_of_scope]
    lines += ["- Treating a reconstruction as evidence of what a hidden region contained.", "",
              "## Factors", "", "Groups audited (sensitive attributes from the data card, and their intersections): "
              + (", ".join(map(text, evidence.bias.groupings)) or "none declared") + ". Domains held out for the "
              "shift audit: " + (", ".join(map(text, evidence.shift.held_out_domains)) or "none") + ".", "",
              "## Metrics", "", "Model quality: hidden-pixel error against a patch-mean predictor, probe and kNN "
              "accuracy against random-init and raw-pixel features, paired on the same unseen images (the model "
              "checks). Hidden-pixel reconstruction MSE and PSNR against a random-init model and a patch-mean "
              "predictor; linear-probe and kNN top-1 accuracy on frozen features against random-init and raw-pixel "
              "features; per-group values (fairlearn MetricFrame) and gaps with BCa bootstrap intervals; held-out "
              "domain error "
              "increase, corruption error, MMD drift test; train against unseen error for memorization.", "",
              "## Evaluation data", "",
              f"The val, test and held-out-domain splits of {text(model.dataset)}, never used for training."
              + (f" Trained on but not evaluated or audited: {', '.join(map(text, evidence.not_audited))}; no "
                 "analysis below covers their images." if evidence.not_audited else ""), "",
              "## Training data", ""]
    lines += [f"- {count} training records of {text(name)} (licence {text(cards[name].license.spdx)}, consent basis "
              f"{cards[name].consent.basis})" for name, count in evidence.training_records.items()]
    lines += ["", "Record ids, with their dataset, in `governance/training_records.csv` on the MLflow run.", "",
              "## Quantitative analyses", ""]
    for area in ("model", "bias", "shift", "memorization"):
        lines += [f"### {area}", ""] + checks_table(evidence.checks(area)) + evidence_table(evidence.checks(area))
    lines += ["Intersectional groups are included in the bias checks above (ids with `x`).", "",
              "## Ethical considerations", ""]
    lines += [f"- {text(b)}" for b in trained.known_biases]
    lines += [f"- Personal information: {text(trained.personal_information.description)}",
              "- Reconstructions look convincing even where they are wrong (see the overtrust section of the report).",
              "", "## Caveats and recommendations", ""]
    lines += [f"- {text(x)}" for x in trained.known_limitations]
    inconclusive = [c.id for c in release.checks if c.status == "inconclusive"]
    if inconclusive:
        lines.append(f"- Inconclusive checks need more evaluation data: {', '.join(map(code, inconclusive))}.")
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                       body="\n".join(lines)))
