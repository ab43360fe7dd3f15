"""Push: the publish-level side of uploading, over the transport in :mod:`publisher.hub`.

What ``publish --push``, ``push`` and the device job share: the options a user gives, the one line the
CLI prints about a push, and keeping the published report when a run publishes what is already there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from publisher.hub import PushResult, format_operations, format_summary, push_folder, read_published_file
from publisher.layout import REPORT_NAME
from publisher.report import PublishReport


@dataclass(frozen=True)
class PushOptions:
    """How a push writes: to which branch, as a pull request, or not at all (a dry run lists the operations)."""

    revision: str | None = None
    create_pr: bool = False
    dry_run: bool = False


def adopt_published_costs(report: PublishReport, options: PushOptions, *, quiet: bool = False) -> PublishReport:
    """The report the target revision already holds when it reports this very publish, else ``report``.

    A cold cache re-measures every stage: published as measured, the new costs alone would make every
    re-run of an unchanged recipe a commit. Whether two reports describe the same publish (same
    artifacts, recipe and tool versions) is :meth:`PublishReport.same_publish`; the package and image
    bytes are compared by the push itself.

    Raises:
        :class:`HubError`: the Hub could not be read (rejected token, server error, network down).
    """
    content = read_published_file(report.target_repo, REPORT_NAME, revision=options.revision, progress=not quiet)
    if content is None:
        return report
    try:
        published = PublishReport.model_validate_json(content)
    except ValidationError:
        return report  # not a report this version can read: this run's replaces it
    return published if published.same_publish(report) else report


def push_folder_and_report(folder: Path, repo_id: str, *, private: bool = False, options: PushOptions,
                           quiet: bool = False, endpoint: str | None = None,
                           commit_message: str | None = None) -> PushResult:
    """Upload an assembled folder in one commit and print what happened (the operations on a dry run).

    ``endpoint`` and ``commit_message`` are :func:`publisher.hub.push_folder`'s.
    """
    result = push_folder(folder, repo_id, private=private, revision=options.revision,
                         create_pr=options.create_pr, dry_run=options.dry_run, endpoint=endpoint,
                         commit_message=commit_message, progress=not quiet)
    print(format_operations(result) if options.dry_run else format_summary(result))
    return result
