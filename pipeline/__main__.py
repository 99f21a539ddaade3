"""Command line: one sub-command per stage, plus the data-card checker.

A user's mistake ends with one line on stderr naming the file and field, and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path

from pipeline import PipelineError
from pipeline.params import DEFAULT_PARAMS

log = logging.getLogger("pipeline")


def _card_check(args: argparse.Namespace) -> int:
    from pipeline.cards import DataCard, card_problems, summary
    from pipeline.params import read_yaml

    status = 0
    for path in args.files:
        try:
            raw = read_yaml(path)
        except PipelineError as exc:
            print(exc)
            status = 1
            continue
        problems = card_problems(raw)
        for field, message in problems:
            print(f"{path}: {field}: {message}")
        if problems:
            status = 1
        else:
            print(f"{path}: ok: {summary(DataCard.model_validate(raw))}")
    return status


def _ingest(args: argparse.Namespace) -> int:
    from pipeline.ingest import ingest

    counts = ingest(args.dataset, params_path=args.params, cards_dir=args.cards)
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.reasons.items())) or "none"
    log.info("%s: read %d = accepted %d + quarantined %d (%s)", args.dataset, counts.read, counts.accepted,
             counts.quarantined, reasons)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pipeline.validate import validate
    from pipeline.validation.summary import failure_lines

    summary = validate(params_path=args.params, cards_dir=args.cards)
    for line in failure_lines(summary, "warning"):
        log.warning("%s", line)
    failures = failure_lines(summary, "critical")
    for line in failures:
        print(f"critical: {line}", file=sys.stderr)
    log.info("validation %s: %d critical, %d warning expectations failed; Data Docs: reports/validation/index.html",
             "passed" if summary.passed else "FAILED", summary.failed_critical, summary.failed_warning)
    return 0 if summary.passed else 1


def _prepare(args: argparse.Namespace) -> int:
    from pipeline.prepare import prepare

    prepare(params_path=args.params, cards_dir=args.cards)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from pipeline.pretrain import pretrain

    pretrain(params_path=args.params, cards_dir=args.cards)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate

    evaluate(params_path=args.params, cards_dir=args.cards)
    return 0


def _audit_bias(args: argparse.Namespace) -> int:
    from pipeline.audit.bias import audit_bias

    result = audit_bias(params_path=args.params, cards_dir=args.cards)
    log.info("bias audit: %s; report: reports/bias/bias.md", result.status.upper())
    return 0


def _audit_shift(args: argparse.Namespace) -> int:
    from pipeline.audit.shift import audit_shift

    result = audit_shift(params_path=args.params, cards_dir=args.cards)
    log.info("domain-shift audit: %s; report: reports/shift/shift.md", result.status.upper())
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipeline.report.stage import report

    result = report(params_path=args.params, cards_dir=args.cards)
    log.info("automated outcome: %s (%d blocking checks); sign-off: %s; %s version %s; report: %s",
             result.decision.upper(), len(result.blocked_by), result.review.state, result.model.registered_model,
             result.model.version, result.report.html)
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from pipeline.artifacts import Layout
    from pipeline.registry import reconcile

    reconcile(Layout())
    return 0


def _release(args: argparse.Namespace) -> int:
    from pipeline.artifacts import Layout
    from pipeline.params import load_params
    from pipeline.registry import release_gate

    layout = Layout()
    release, lines = release_gate(args.release_file or layout.release_file, layout.run_file)
    for line in lines:
        print(line)
    settings = load_params(args.params).report
    if release is None:
        approved = False
    elif not settings.require_signoff:
        approved = release.decision == "eligible"
        print("no human signed: report.require_signoff is false, the automated outcome decides")
    else:
        from pipeline.review.actions import verify
        from pipeline.tracking import reachable

        try:
            with reachable():
                _, review = verify(release.model.version, args.params, args.cards, layout)
        except PipelineError as exc:  # fail closed: a sign-off nobody can verify approves nothing
            print(f"sign-off: cannot be verified here: {exc}")
            approved = False
        else:
            for line in review.problems:
                print(line)
            approved = review.state == "approved"
            print(f"sign-off: {review.state}")
    print(f"release decision: {'APPROVED' if approved else 'BLOCKED'}; report: {layout.governance / 'report.html'}")
    return 0 if approved else 1


def _keygen(args: argparse.Namespace) -> int:
    from pipeline.review.reviewers import keygen

    line = keygen(args.out)
    log.info("private key written to %s (readable by you only; never commit it)", args.out)
    print(f"public_key: {line}")
    return 0


def _show_review(release, review) -> None:
    model = release.model
    print(f"{model.registered_model} version {model.version} (run {model.run_id}): automated outcome "
          f"{release.decision}; sign-off: {review.state} ({review.required_signoffs} approvals required)")
    for check in release.checks:
        if check.status in ("fail", "inconclusive"):
            blocking = "blocking" if check.id in release.blocked_by else "not blocking"
            print(f"  {check.id}: {check.status}, {blocking} (waivable)")
    for view in review.signoffs:
        waived = ", ".join(f"{w.check} until {w.expires}" for w in view.waivers) or "no waivers"
        holds = "holds" if not view.problems else f"void: {'; '.join(view.problems)}"
        print(f"  {view.time} {view.reviewer}: {view.decision}, {waived}; {holds}")
    for line in review.problems:
        print(f"  not approved: {line}")


def _review_show(args: argparse.Namespace) -> int:
    from pipeline.artifacts import Layout
    from pipeline.review.actions import verify

    release, review = verify(args.version, args.params, args.cards, Layout())
    _show_review(release, review)
    return 0


def _review_sign(args: argparse.Namespace) -> int:
    from pipeline.artifacts import Layout
    from pipeline.review.actions import Request, sign_off

    waivers = list(args.waive or [])  # approve's --waive; none for reject
    if args.review_command == "waive":
        waivers += [f"{args.check}={args.reason},{args.expires}"]
    request = Request(decision=args.review_command, reviewer=args.reviewer, key=args.key, comment=args.comment,
                      waivers=waivers)
    layout = Layout()
    review = sign_off(request, args.version, args.params, args.cards, layout)
    _show_review(layout.release(), review)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.artifacts import Layout
    from pipeline.review.actions import verify

    release, review = verify(args.version, args.params, args.cards, Layout())
    for line in review.problems:
        print(line)
    model = release.model
    reviewers = ", ".join(sorted({v.reviewer for v in review.signoffs if not v.problems})) or "nobody"
    print(f"{model.registered_model} version {model.version}: sign-off {review.state} (holding sign-offs: "
          f"{reviewers}); {len(review.problems)} problems")
    return 0 if review.state in ("approved", "not required") and not review.problems else 1


def _consent_check(args: argparse.Namespace) -> int:
    from pipeline.params import load_params
    from pipeline.policy import load_withdrawals
    from pipeline.registry import consent_check

    params = load_params(args.params)
    path = Path(params.policy.withdrawals_file)
    findings = consent_check(params.report.registered_model, load_withdrawals(path), str(path))
    touched = [f for f in findings if f["withdrawn"] or f["records"] is None]
    for f in findings:
        if f["records"] is None:
            print(f"{params.report.registered_model} version {f['version']} (run {f['run_id']}): cannot tell, "
                  f"{f['error']}")
        elif f["withdrawn"]:
            shown = ", ".join(f["withdrawn"][:5]) + (" ..." if len(f["withdrawn"]) > 5 else "")
            print(f"{params.report.registered_model} version {f['version']} (run {f['run_id']}): trained on "
                  f"{len(f['withdrawn'])} withdrawn records: {shown}")
    log.info("%d of %d registered versions of %s trained on records withdrawn in %s", len(touched), len(findings),
             params.report.registered_model, path)
    return 1 if touched else 0


def _results(args: argparse.Namespace) -> int:
    from pipeline.results import read_run, replace_block, results_markdown

    markdown = results_markdown(read_run(args.root), args.command_text)
    if args.readme is None:
        print(markdown, end="")
        return 0
    try:
        document = args.readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"{args.readme}: cannot read ({exc.strerror})") from None
    args.readme.write_text(replace_block(document, args.block, markdown, args.readme), encoding="utf-8")
    log.info("%s: block %s rewritten from the run in %s", args.readme, args.block, args.root)
    return 0


def _tracking(args: argparse.Namespace):
    """A stage that talks to MLflow fails at once, in one line, when the tracking server does not answer;
    the others do not import tracking at all (their DVC stages do not depend on it)."""
    if not getattr(args, "tracked", False):
        return contextlib.nullcontext()
    from pipeline.tracking import reachable

    return reachable()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="MAE dataset governance and training audit pipeline. Each stage reads params.yaml and "
        "writes only its declared outputs; `dvc repro` runs them in order.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    card = commands.add_parser("card", help="work with data cards")
    card_commands = card.add_subparsers(dest="card_command", required=True, metavar="ACTION")
    check = card_commands.add_parser(
        "check", help="validate data cards",
        description="Validate data cards against the schema and the cross-field rules. Prints every problem "
        "with its field path and exits 1; a valid card prints a one-line summary.")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="data card YAML file(s)")
    check.set_defaults(handler=_card_check)

    def stage(name: str, help: str, description: str, handler, cards: bool = True,
              tracked: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description)
        sub.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
        if cards:
            sub.add_argument("--cards", type=Path, default=Path("data_cards"), help="folder of data cards")
        sub.set_defaults(handler=handler, tracked=tracked)
        return sub

    stage("ingest", "ingest one dataset (DVC stage ingest@DATASET)",
          "Read a dataset through its source, apply the consent and licence policy to every record, and write "
          "data/ingested/DATASET/: manifest.parquet (accepted records), pixels/ (uint8 shards), quarantine.parquet "
          "(rejected records with a reason) and provenance.json (counts and digests).",
          _ingest, tracked=False).add_argument("dataset", help="a dataset named under `datasets:` in params.yaml")
    stage("validate", "validate every ingested dataset with Great Expectations (DVC stage validate)",
          "Build Great Expectations suites from each dataset's card and params.yaml (schema, governance, identity "
          "within and across datasets, content, coverage, and the card itself), run them, and write Data Docs and "
          "summary.json to reports/validation/. Exits 1 when a critical expectation fails, printing one line per "
          "failure; warnings are kept for the governance report.", _validate, tracked=False)
    stage("prepare", "split validated data into train / val / test / heldout (DVC stage prepare)",
          "Refuse to run unless reports/validation/summary.json says validation passed. Then split each dataset: "
          "each record's split is a keyed hash of (prepare.seed, its image sha256), so a withdrawal moves no other "
          "record, and strata of domain and sensitive group keep their shares within a stated binomial tolerance; "
          "keep the card's held-out domains out of training (split `heldout`, for the shift audit), check that no "
          "image appears in two splits, and write data/prepared/<dataset>/<split>.parquet and .npy plus "
          "split_sizes.json.", _prepare, tracked=False)
    stage("pretrain", "pretrain the MAE and record it in MLflow (DVC stage pretrain)",
          "Train a Masked Autoencoder on data/prepared/<dataset>/train.npy of each dataset pretrain.datasets lists "
          "(each epoch drawn from them by weight; each card must allow training) with the settings under "
          "`pretrain:` in params.yaml. Writes models/mae/ (model.pt, config.json, run.json, reconstructions.png), "
          "metrics/pretrain.json and metrics/pretrain_loss.csv, and logs params, per-step metrics, lineage tags, "
          "datasets, figures and the encoder to one MLflow run ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db). "
          "Resumes from models/checkpoints/ when it was written for the same params and data. Runs under torchrun "
          "for multi-process DDP: `torchrun --standalone --nproc_per_node N -m pipeline pretrain`.", _pretrain)
    stage("evaluate", "evaluate the pretrained model against baselines (DVC stage evaluate)",
          "Reconstruct every image of every split of the model's dataset on masks fixed by evaluate.seed "
          "(hidden-pixel MSE and PSNR, against a randomly initialised model of the same architecture and a "
          "patch-mean predictor); where the card has labels, fit a linear probe and a kNN classifier on frozen "
          "train features and score them on val / test / heldout, against random-init and raw-pixel features. "
          "Writes data/eval/ (samples.parquet: one row per image, what the audits read, memorization in the report "
          "included; embeddings/<kind>.npy: each encoder's features, row i for the table's row i), metrics/eval.json, "
          "reconstruction grids per group and domain in reports/eval/, and logs them to the model's MLflow run.",
          _evaluate)
    stage("audit-bias", "audit per-group and intersectional disparities (DVC stage audit_bias)",
          "With fairlearn's MetricFrame, compare reconstruction error and probe / kNN accuracy across the card's "
          "sensitive groups and their intersections on unseen images, with bootstrap intervals; decide each check "
          "pass / fail / inconclusive against the thresholds under `audit_bias:`; compare training shares with the "
          "card's population shares. Writes reports/bias/ (bias.json, bias.md, charts) and logs it to the model's "
          "MLflow run. A failed check is a finding for the report, not an error: the exit status is 0.", _audit_bias)
    stage("audit-shift", "audit held-out domains, corruptions and embedding drift (DVC stage audit_shift)",
          "Compare each held-out domain of the card with unseen in-distribution images (reconstruction error, probe "
          "accuracy, bootstrap intervals); run six corruptions at five severities (degradation curves, mean "
          "corruption error, with a bootstrap interval); test embedding drift (MMD permutation test, domain-classifier "
          "AUC) of each held-out domain against unseen in-distribution images, with test against val images as "
          "the control and unseen against training images as the fit to training; draw "
          "reconstructions at several mask ratios with their errors. Decides each check against the thresholds "
          "under `audit_shift:`, writes reports/shift/ (shift.json, shift.md, figures) and logs it to the model's "
          "MLflow run. Exit status 0 whatever the findings.", _audit_shift)
    stage("report", "write the governance report and register the model (DVC stage report)",
          "Answer each governance question (model quality against trivial baselines, provenance, consent, "
          "validation, training, evaluation, bias, domain shift, memorization, overtrust, intended use) with the "
          "evidence the earlier stages wrote, and decide the release: blocked when a check not listed under "
          "report.advisory has a status that report.block_on says blocks it. Writes "
          "reports/governance/ (report.html that opens offline, report.md, model_card.md, release.json, "
          "training_records.csv, croissant/<dataset>.json, figures/), registers the encoder as a version of "
          "report.registered_model with the decision and data hashes as tags and alias `candidate` on it, and "
          "logs the folder to the model's run. The decision is eligible or blocked: the alias `approved` moves "
          "only with reviewers' sign-offs (`review`), which still hold when a re-run changed nothing they "
          "signed; with report.require_signoff false, whenever the version is eligible. Exit status 0 whatever "
          "the decision.", _report)
    stage("reconcile", "bring the registry to what the report says (DVC stage registry, run every time)",
          "Register the model's run as the version reports/governance/release.json names, if it is not, and set "
          "that version's tags, description and aliases and the governance artifacts on its run and logged model "
          "to what the report wrote. Idempotent; `dvc repro` runs it after every report, so a report stopped "
          "after it registered the version is healed by the next `dvc repro`.", _reconcile, cards=False)
    release = stage("release", "the release gate: exit 0 only for a signed-off version of the current model",
                    "Read reports/governance/release.json and print every check that blocks the release (one per "
                    "line). With report.require_signoff (the default) run `verify` on its version and exit 0 only "
                    "when its sign-offs approve it: they verify, still match every file they name, and cover each "
                    "blocking check with a holding waiver; with require_signoff false, exit 0 when the automated "
                    "outcome is eligible. Exit 1 otherwise, or when the report was written for another model than "
                    "models/mae/run.json's. For a CI/CD release job.", _release, tracked=False)
    release.add_argument("--release-file", type=Path,
                         help="release decision to check (default: reports/governance/release.json)")
    review = commands.add_parser(
        "review", help="a reviewer signs off a registered version: show, approve, reject, waive, keygen",
        description="The gate proposes (eligible / blocked), a person disposes. A sign-off is an in-toto Statement "
        "naming the SHA-256 of what was reviewed (release.json, report.html, report.md, model_card.md, the model "
        "files, training_records.csv, each training dataset's manifest and card, params.yaml, the git commit), "
        "signed with the reviewer's Ed25519 key in a DSSE envelope, logged on the version's MLflow run with "
        "version tags. The key must be listed in report.reviewers_file (governance/reviewers.yaml). The alias "
        "`approved` moves when report.required_signoffs reviewers approve and every blocking check is waived.")
    actions = review.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    keygen = actions.add_parser("keygen", help="make a reviewer's key pair",
                                description="Write a new Ed25519 private key (PEM, readable by you only) to --out "
                                "and print the public key line to add under your name in governance/reviewers.yaml.")
    keygen.add_argument("--out", type=Path, required=True, help="private key file to create (never overwritten)")
    keygen.set_defaults(handler=_keygen)

    def review_action(name: str, help: str, description: str, handler, signs: bool) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=description)
        sub.add_argument("--version", help="registered version (default: the one reports/governance describes)")
        sub.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
        sub.add_argument("--cards", type=Path, default=Path("data_cards"), help="folder of data cards")
        if signs:
            sub.add_argument("--reviewer", required=True, help="your name as governance/reviewers.yaml lists it")
            sub.add_argument("--key", type=Path, required=True, help="your private key file (review keygen)")
            sub.add_argument("--comment", required=True, help="what you checked and why you decide so")
        sub.set_defaults(handler=handler, tracked=True, waive=None)
        return sub

    review_action("show", "what a version's review stands at",
                  "Print the version's automated outcome, its fail and inconclusive checks (the waivable ones), "
                  "every recorded sign-off and whether it still holds, and what stands between it and approval.",
                  _review_show, signs=False)
    waive_help = "waive a fail or inconclusive check: CHECK_ID=reason,YYYY-MM-DD (repeatable)"
    review_action("approve", "approve the version (with waivers for any blocking check)",
                  "Sign an approval of the report in reports/governance. A blocked version is approved only with "
                  "a --waive for each blocking check; a waiver binds to the check's evidence now, and a later "
                  "report with worse evidence, or its expiry, voids it.", _review_sign,
                  signs=True).add_argument("--waive", action="append", metavar="CHECK_ID=REASON,EXPIRY",
                                           help=waive_help)
    review_action("reject", "reject the version: the alias approved leaves it",
                  "Sign a rejection of the report in reports/governance. While it holds, the version is not "
                  "approved, whoever else approves it.", _review_sign, signs=True)
    waive = review_action("waive", "waive one check without approving",
                          "Sign a waiver of one fail or inconclusive check, with a justification and an expiry "
                          "date, for another reviewer's approval to count on.", _review_sign, signs=True)
    waive.add_argument("--check", required=True, help="the check id (as release.json names it)")
    waive.add_argument("--reason", required=True, help="why the risk is accepted")
    waive.add_argument("--expires", required=True, help="last day the waiver holds (YYYY-MM-DD)")
    verify = stage("verify", "check a version's sign-offs against the files, keys and withdrawals",
                   "Recompute every digest the version's sign-offs name (from the workspace and the registry), "
                   "verify their signatures against governance/reviewers.yaml, check their waivers (expiry, worse "
                   "evidence) and that no consent withdrawal touches the version's training records. Exit 0 when "
                   "the sign-offs approve the version, else 1 with one line per problem naming the file or check.",
                   _verify)
    verify.add_argument("--version", help="registered version (default: the one reports/governance describes)")
    stage("consent-check", "list registered model versions trained on withdrawn records",
          "Read the withdrawals file (policy.withdrawals_file: record ids, pixel sha256s or source-file sha256s) "
          "and every registered version of report.registered_model with the training record ids logged beside "
          "it; print each version trained on a withdrawn record and tag it in MLflow (consent.status = "
          "withdrawn_records). Exit 1 when any version is affected or cannot be checked. The next `dvc repro` "
          "quarantines the records and retrains.", _consent_check, cards=False)
    results = commands.add_parser(
        "results", help="the run's headline numbers as Markdown (for README.md)",
        description="Render the numbers a finished run wrote (metrics/pretrain.json, metrics/eval.json, "
        "reports/governance/release.json): pretraining against its baseline, reconstruction, probe and kNN per "
        "split against the baselines, and every release check. Prints them, or with --readme replaces the block "
        "between <!-- results:BLOCK --> and <!-- /results:BLOCK --> in that file.")
    results.add_argument("--root", type=Path, default=Path("."), help="the run's folder (default: here)")
    results.add_argument("--command", dest="command_text", default="make run",
                         help="how the run was produced, stated above the numbers (default: make run)")
    results.add_argument("--readme", type=Path, help="Markdown file whose block to replace")
    results.add_argument("--block", default="default", help="block name (default: default)")
    results.set_defaults(handler=_results)
    return parser


def _terminated(signum: int, frame) -> None:
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C, so a stage removes its partial outputs."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Ctrl-C unwinds even where the stage inherited SIGINT ignored (a background job, a test runner's worker):
    # an ignored interrupt would let a stopped stage run on to the end
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        with _tracking(args):
            return args.handler(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # a write outside a stage's outputs: a checkpoint, mlflow.db, a log
        from pipeline.artifacts import disk_error

        refused = disk_error(exc, Path(getattr(exc, "filename", None) or "."))
        if refused is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
