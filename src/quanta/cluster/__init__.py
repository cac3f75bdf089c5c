"""quanta.cluster: N engine instances behind one torch-free global scheduler (Llumnix-style).

One concept per file; nothing here imports torch or ray, so the simulator and the Ray runtime run the
same code.

    state.py         InstanceState (+ RunningInfo): an instance's snapshot, from EngineCore.instance_state()
    load.py          load metrics: freeness (Llumnix), kv_ratio, vllm_load (4*waiting + running), token_load
    view.py          ClusterView: last snapshots + dispatches counted since (reconciled by num_added),
                     draining instances, migrations in flight
    prefix_index.py  PrefixIndex: each instance's prefix-cache hashes, mirrored from snapshot deltas
    router.py        Router base, registry, make_router(name, **args), dispatch(router, view, req)
    routers/         round-robin, least-load, power-of-two, freeness, session, prefix (one file each)
    rescheduler.py   Rescheduler.plan(view) -> [MigrationOrder]: balanced / defrag pairing on a freeness
                     threshold, one migration per instance, shortest-running-first; draining
    snapshot.py      RequestSnapshot: a running request, picklable, continued identically elsewhere
    transport.py     KVPayload, KVTransport (send -> handle -> recv, seconds(nbytes)); InProcessTransport,
                     SimulatedTransport (latency + bytes / bandwidth)
    endpoint.py      MigrationEndpoint(core, transport): one instance's coarse, picklable migration calls
                     (what a Ray actor exposes): reserve, stage_out, stage_in, abort_in, finish_out,
                     watchdog, abort, state
    migration.py     Migration: the multi-stage pre-copy state machine with its abort rules;
                     advance(src, dst, now) -> seconds of the copy it started
    local.py         LocalCluster: in-process instances, a controller loop (poll, dispatch, reschedule,
                     migrate between steps) for tests and offline use

The runtime over real engines (these import quanta.engine, and ray only in ray_instances.py):

    worker.py        InstanceWorker: one engine instance stepping on its own thread, long-polled for tokens
    instances.py     Instances handles: LocalInstances (in-process workers); InstanceDiedError
    ray_instances.py RayInstances (one actor per instance), RayObjectTransport (KV via the object store)
    remote.py        RemoteEndpoint: an instance's MigrationEndpoint as calls from the front end
    engine.py        ClusterEngine: the EngineFrontend over instances (mirror requests, owner table,
                     dispatch, rescheduling, migrations on their own threads, failover)

Driving a migration from a controller (e.g. the API server process, with actor proxies as endpoints):

    m = Migration(order.request_id, order.src, order.dst, order.num_blocks, seconds=transport.seconds)
    view.migrations[m.request_id] = (m.src, m.dst)
    while not m.finished:
        m.advance(endpoints[m.src], endpoints[m.dst], now())  # each phase: one or two endpoint calls
    del view.migrations[m.request_id]          # on DONE the request's owner becomes m.dst

The engines keep stepping between phases (a real source decodes while stages copy); only LAST_OUT ->
COMMIT is downtime for the request. Engine-side hooks the endpoints use: Scheduler.stop_for_migration /
resume_migrated / release_migrated / commit_migrated, KVCacheManager.reserve / unreserve /
adopt_reserved, BlockPool.drain_hash_log, and on executors read_kv_blocks / write_kv_blocks /
get_generator_state / set_generator_state.
"""
