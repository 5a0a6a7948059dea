"""Several Dagster runs of one `flux2-pipeline materialize` at once, each in a worker process.

Threads would not do: Dagster's SQLite storages deadlock when several runs execute in
one process. The workers fork from one server (multiprocessing's forkserver, `server`)
that imported what a run needs once (`preload`), so a worker starts in milliseconds
instead of importing Dagster again, and forks from a process with no threads.

Each run gets a worker process of its own (`worker`), which ends with its run; the
`launcher` starts the next run's worker when one ends, so a worker that dies (killed, out
of memory) fails only its own run. The command and each worker share one pipe: the
worker sends its run's summaries back on it, the command sends `STOP` on it to stop the
run. The pipe is also how a worker learns that the command has died, whatever killed it
(SIGKILL, the OOM killer, a CI timeout): the kernel closes the command's end, and the
worker's `watch_command` thread reads end-of-file. The worker then stops its run as a
stop from the command would (queued jobs cancelled, running ones kept in the ledger) and
ends within `ORPHAN_GRACE_S` at the latest, so an orphan never keeps paying and never
starts another run (only the command starts runs).

Why a pipe and not Linux's PR_SET_PDEATHSIG: the death signal fires on the death of the
parent *thread* that forked the child, and a worker's parent is the worker server, not
the command; the server would have to watch the command and the workers the server, and
a server killed on its own would take every worker with it without a clean stop. It is
Linux-only, too. End-of-file on a pipe whose write end only the command holds (the
server gets the worker's end for the fork alone, and closes its copy) needs neither.

`gate.StartGate` lets at most one run per core start at a time, so the first runs reach
the API sooner. This `__init__`, `server` and `gate` import only the standard library:
the command starts the server before it imports Dagster (`server.start_early`).
"""
