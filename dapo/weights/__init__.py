"""Learner -> rollout weight sync over torch.distributed, with the rendezvous in Redis.

The learner (`WeightSender`, always rank 0, the broadcast root) and the rollout
workers (`WeightReceiver` in `dapo.weights.receiver`, ranks 1..N) form a process group per *generation*,
a fixed membership. Groups are built without `init_process_group` (which a
process may call once) from a TCPStore hosted by the learner: generation g
uses `PrefixStore(f"gen{g}", store)` and a `ProcessGroupGloo` (CPU) or
`ProcessGroupNCCL` (CUDA), chosen by the device, with the same code around it.
Parameters travel in the flat buckets of `dapo.weights.buckets`.

Redis keys, all under `run_key(run_id, "weights")` = `dapo:{<run_id>}:weights:`
  rendezvous      hash, written by the learner at start: host, port (of its
                  TCPStore), incarnation (fresh per learner process),
                  fingerprint, layout (json specs + bucket_mb), summary,
                  backend, timeout_s, collective_timeout_s, join_timeout_s;
                  then per update pending_update (a counter), pending_version, plan
                  (json: version, update, incarnation, generation, members,
                  fingerprint), generation and version
                  (last completed broadcast). Deleted by `WeightSender.close`.
  workers         hash worker_id -> json {fingerprint}, written by each worker
                  at join and on every heartbeat.
  alive:{w}       string with a TTL of `liveness_s`, refreshed by the worker's
                  heartbeat thread every liveness_s / 3; expiry = presumed dead.
  inbox:{w}       list; the learner pushes wake-up tokens so a worker blocked
                  in `poll` reacts at once (tokens carry no data).
  acks:{inc}:{u}  list; workers push json {worker_id, fingerprint, session} to
                  take part in update u (session: fresh per worker process).
  expected        hash version -> checksum of the learner's buffers (last 64).
  reports         hash worker_id -> json {version, checksum, time}.
  latest          hash {version, checkpoint_dir}: the newest checkpoint.

Joining: `WeightReceiver.join` waits for the rendezvous, builds its layout
from the learner's published specs (after checking its own parameter names and
shapes against them; dtypes may differ, `load_fn` converts), registers and
starts its heartbeat. It takes part from the next update on.

One update (learner `broadcast(v)`; workers `poll()` between decode steps of a
generation, between generation batches, or while idle):
  1. learner sets rendezvous.pending_update = u (one more than the last) and
     pending_version = v, pushes a token to the inbox of every live
     registered worker; v may repeat (a resend to workers that missed it),
     u never does;
  2. a worker seeing a new (incarnation, pending_update) pushes its ack (also
     a worker that joined while that update was pending: the learner counts
     every live worker and waits for it);
  3. the learner collects acks until every live worker answered or
     `join_timeout_s` passed; members = the ackers, sorted (rank = index + 1);
  4. if members differ from the current generation's (a join, a leave, a
     failure, or a worker restarted under the same id: another session),
     generation += 1; the learner writes the plan and wakes the
     ackers; workers named in the plan build the new group if its
     (incarnation, generation) is new to them; a worker left out returns None;
  5. the learner fills bucket by bucket in the wire dtype (from its flat
     buffers, or streamed through a few staging buffers: `dapo.weights.stream`),
     starting each bucket's broadcast as soon as it is filled, at most a few on
     the wire, computes the checksum while the bytes are in flight and
     publishes it in `expected`; workers receive (whole, or streamed bucket by
     bucket), call `load_fn` with views, and report version + checksum.

Failures. Building a group and the transfer of one broadcast are each bounded
by the collective timeout, `timeout_s` plus the model's bytes at a minimum
bandwidth, and each bucket by its own timeout scaled to its bytes
(`dapo.weights.sender` says why); a member that died, hangs or
crawls makes the learner's `broadcast` raise `WeightSyncError` within about
that time, and the generation is abandoned: the next update forms a new one
from whoever acks. A worker whose collective fails raises `WeightSyncError`
from `poll` and simply acks the next update. A worker that never acks (dead,
or busy for longer than `join_timeout_s`; a rollout worker whose engine takes
updates between decode steps acks within one step) is left out of that
update; its registration is dropped once its `alive` key expires. Every
broadcast carries the full weights, so missing updates costs nothing but
staleness. A worker that starts late can load the newest checkpoint
(`needs_checkpoint`) to generate before the next update, which it joins by
acking it.
"""
