"""`omp publish <release dir> --repo-id org/name`: upload a release with huggingface_hub.

The release goes to the `main` branch, all but `checkpoints/`; each rung of the checkpoint ladder
`checkpoints/step-NNNNNNN/` becomes the branch `step-NNNNNNN` (the open suites' convention), made
from that commit of main with the rung's files on top, so
`from_pretrained(repo_id, revision="step-NNNNNNN")` loads the rung (`omp verify org/name` checks them).

The token comes only from the environment (HF_TOKEN) or the local `hf auth login` cache, and is
passed to huggingface_hub directly: it is never printed, logged or written. Without a token, or
when the hub cannot be reached, it is a dry run that lists what would be uploaded and exits 0.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.integrity import check_relpath
from pipeline.core.io import read_json


LADDER_DIR = "checkpoints"


def _listing(release: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(release).as_posix(), p.stat().st_size) for p in sorted(release.rglob("*")) if p.is_file()]


def branches(release: Path, lineage: dict) -> list[tuple[str, Path]]:
    """(hub branch, rung folder) of every rung the lineage lists, in step order."""
    out = []
    for r in (lineage.get("ladder") or {}).get("rungs") or []:
        path = check_relpath(r.get("path"), "lineage.json: ladder.rungs.path")
        out.append((path.split("/")[-1], release / path))
    return out


def run(release: Path, repo_id: str | None, private: bool = False) -> dict:
    release = Path(release)
    lineage_file = release / "lineage.json"
    if not lineage_file.is_file():
        raise PipelineError(f"{lineage_file}: not found; is {release} a release made by `omp release`?")
    lineage = read_json(lineage_file)
    repo_id = repo_id or lineage.get("recipe", {}).get("release", {}).get("repo_id")
    if not repo_id or "/" not in repo_id:
        raise PipelineError(f"--repo-id: give the hub repository as org/name (got {repo_id!r})")
    files = _listing(release)
    rungs = branches(release, lineage)
    tag = f"{lineage['name']}-{lineage['model_sha256'][:12]}"
    from huggingface_hub import HfApi, get_token

    token = get_token()
    reason = None
    if not token:
        reason = "no Hugging Face token (set HF_TOKEN or run `hf auth login`)"
    else:
        api = HfApi(token=token)
        try:
            api.whoami()
        except Exception as e:  # offline mode, DNS, refused connection, bad token: all mean "cannot upload"
            reason = f"the hub is not reachable or refused the token ({type(e).__name__})"
    if reason:
        print(f"dry run: {reason}. Would upload {len(files)} files "
              f"({sum(s for _, s in files) / 2**20:.2f} MiB) to {repo_id}, tag {tag}:")
        for name, size in files:
            if not name.startswith(f"{LADDER_DIR}/"):
                print(f"  {name}  ({size:,} bytes)")
        for branch, folder in rungs:
            n = sum(1 for p in folder.iterdir() if p.is_file())
            print(f"  branch {branch}: main + {n} files of {LADDER_DIR}/{branch}/")
        return {"dry_run": True, "repo_id": repo_id, "files": [n for n, _ in files], "tag": tag,
                "branches": [b for b, _ in rungs]}
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(release), repo_id=repo_id, repo_type="model",
                               ignore_patterns=[f"{LADDER_DIR}/*"],
                               commit_message=f"Open Model Pipeline release {lineage['name']}")
    oid = getattr(commit, "oid", None)
    api.create_tag(repo_id, tag=tag, revision=oid, exist_ok=True)
    for branch, folder in rungs:   # each rung: a branch from this commit of main, the rung's files on top
        api.create_branch(repo_id, branch=branch, revision=oid, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=branch,
                          commit_message=f"{lineage['name']} checkpoint {branch}")
    print(f"uploaded {len(files)} files to https://huggingface.co/{repo_id} (tag {tag}; "
          f"{len(rungs)} checkpoint branches step-NNNNNNN)")
    return {"dry_run": False, "repo_id": repo_id, "files": [n for n, _ in files], "tag": tag,
            "branches": [b for b, _ in rungs]}
