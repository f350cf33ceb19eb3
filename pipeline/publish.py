"""`omp publish <release dir> --repo-id org/name`: upload a release with huggingface_hub.

The token comes only from the environment (HF_TOKEN) or the local `hf auth login` cache, and is
passed to huggingface_hub directly: it is never printed, logged or written. Without a token, or
when the hub cannot be reached, it is a dry run that lists what would be uploaded and exits 0.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import read_json


def _listing(release: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(release).as_posix(), p.stat().st_size) for p in sorted(release.rglob("*")) if p.is_file()]


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
            print(f"  {name}  ({size:,} bytes)")
        return {"dry_run": True, "repo_id": repo_id, "files": [n for n, _ in files], "tag": tag}
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(release), repo_id=repo_id, repo_type="model",
                               commit_message=f"Open Model Pipeline release {lineage['name']}")
    api.create_tag(repo_id, tag=tag, revision=getattr(commit, "oid", None), exist_ok=True)
    print(f"uploaded {len(files)} files to https://huggingface.co/{repo_id} (tag {tag})")
    return {"dry_run": False, "repo_id": repo_id, "files": [n for n, _ in files], "tag": tag}
