//! Where an actor's guest code runs: the actor pool, and the slow lane that plugins which
//! have run slow are moved to, so that a spinning guest never holds the threads healthy
//! devices need (see [`ActorPool`]).

use super::*;

/// How many times one event may be stopped and handled afresh on the slow lane
/// (`CallError::Moved`): once for the plugin turning out slow, once more for a version that
/// moved while the device was rebuilt. Past that the stop is told as the server's overload.
pub(super) const MAX_MOVES: u32 = 2;

/// Decides `event` on the live instance, on the slow lane if its plugin has run slow (see
/// [`ActorPool`]): the instance goes there for the event and comes back. A panic there
/// unwinds this actor's task, as one on the pool would. Lost (`live` left empty) only if the
/// slow lane stopped under it (the process stopping).
pub(super) async fn decide_live(
    live: &mut Option<Live>,
    env: &ActorEnv,
    ctx: &EventContext,
    event: &str,
    max_output: usize,
    budget: Duration,
) -> Result<decide::Decided, Failed> {
    let lost = |why: String| Failed {
        error: Error::Internal(why),
        instance_lost: true,
    };
    match live {
        Some(current) if !current.instance.ran_slow() => {
            return decide::decide_with(
                &mut current.instance,
                ctx,
                event,
                max_output,
                budget,
                Preemption::Move,
            )
            .await;
        }
        Some(_) => {}
        None => return Err(lost("no live instance".into())),
    }
    env.metrics.slow_lane_events.fetch_add(1, Ordering::Relaxed);
    let (ctx, event) = (ctx.clone(), event.to_owned());
    to_slow_lane(live, env, move |mut moved| async move {
        let decided = decide::decide_with(
            &mut moved.instance,
            &ctx,
            &event,
            max_output,
            budget,
            Preemption::Yield,
        )
        .await;
        (moved, decided)
    })
    .await
    .map_err(lost)?
}

/// A guest call that changes no state, run as a unit of its own ([`Instance::query_unit`],
/// [`Instance::snapshot_unit`]), as [`read_live`] runs it.
pub(super) type ReadUnit<R> = for<'a> fn(&'a mut Instance, Preemption) -> ReadFuture<'a, R>;

pub(super) type ReadFuture<'a, R> = Pin<Box<dyn Future<Output = Result<R, CallError>> + Send + 'a>>;

pub(super) fn query_unit(i: &mut Instance, p: Preemption) -> ReadFuture<'_, String> {
    Box::pin(i.query_unit(p))
}

pub(super) fn snapshot_unit(i: &mut Instance, p: Preemption) -> ReadFuture<'_, Vec<u8>> {
    Box::pin(i.snapshot_unit(p))
}

/// Runs `unit` (a read of the state, a snapshot) on the live instance where [`decide_live`]
/// would decide an event: on the pool (stopped there once seen slow, `Preemption::Move`), or
/// on the slow lane if its plugin has run slow, counted in `slow_lane`. The outer `Err` if
/// there is no live instance, or the slow lane lost it.
pub(super) async fn read_live<R: Send + 'static>(
    live: &mut Option<Live>,
    env: &ActorEnv,
    unit: ReadUnit<R>,
    slow_lane: Option<&AtomicU64>,
) -> Result<Result<R, CallError>, String> {
    match live {
        Some(current) if !current.instance.ran_slow() => {
            return Ok(unit(&mut current.instance, Preemption::Move).await);
        }
        Some(_) => {}
        None => return Err("no live instance".into()),
    }
    if let Some(counter) = slow_lane {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    to_slow_lane(live, env, move |mut moved| async move {
        let out = unit(&mut moved.instance, Preemption::Yield).await;
        (moved, out)
    })
    .await
}

/// Runs `unit` on the slow lane with the live instance, which it hands back with its result.
/// `Err` (the instance lost, `live` left empty) only if the slow lane stopped under it.
pub(super) async fn to_slow_lane<T, F>(
    live: &mut Option<Live>,
    env: &ActorEnv,
    unit: impl FnOnce(Live) -> F,
) -> Result<T, String>
where
    F: Future<Output = (Live, T)> + Send + 'static,
    T: Send + 'static,
{
    let moved = live.take().ok_or("no live instance")?;
    match on_slow_lane(env.slow_lane.spawn(unit(moved))).await {
        Ok((back, out)) => {
            *live = Some(back);
            Ok(out)
        }
        Err(why) => Err(format!("the slow lane lost the instance: {why}")),
    }
}

/// What a task on the slow lane returned. Its panic is the actor's, as it would have been on
/// the pool: it unwinds the actor's task, supervision rebuilds the device (see `spawn`), and
/// no plugin is blamed. `Err` only if the slow lane stopped under it.
pub(super) async fn on_slow_lane<T>(
    task: tokio::task::JoinHandle<T>,
) -> Result<T, tokio::task::JoinError> {
    task.await.map_err(|e| match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        Err(e) => e,
    })
}

/// The threads that run actors, and so all guest code of live devices.
///
/// A tokio runtime of its own, apart from the one that serves HTTP: a guest that spins until
/// its deadline, or many of them at once, occupies these threads only, and the server keeps
/// accepting connections, answering `/healthz` and refusing with 429/503 on time. On a
/// machine with few cores the kernel still shares the cores between both; what the split
/// guarantees is that a spinning guest never sits on a thread an HTTP task is waiting for.
///
/// # The slow lane
///
/// Events, reads and activations of a plugin that has run slow (an event or a read that used
/// two epoch ticks, 20 ms, of CPU time, see `CompiledPlugin::ran_slow`), and the activations
/// alone of one slow only to build a state (`CompiledPlugin::setup_runs_slow`), run on a second runtime,
/// `drover-slow`, of half as many threads (at least one; `ActorConfig::slow_threads`): the
/// actor stays on the pool and its instance goes to the slow lane for the event. There each
/// guest call runs on a fiber that yields its thread at every epoch tick, so slow devices
/// take turns among themselves; and however many guests spin, they hold at most half the
/// cores, so a healthy device's event on the pool finds one. The event or read that shows a
/// plugin slow is stopped on the pool and handled afresh here (`Preemption::Move`, see `on_event`).
///
/// With eight devices looping on two cores, a thermostat's readings had a p99 of 0.50-0.92
/// ms, within its unloaded p99 (0.63-1.02 ms); with as many slow-lane threads as the pool's,
/// 2.8-4.9 ms (a woken thread waited for the kernel to preempt a spinning one); with every
/// guest on the pool yielding at each tick, 19-21 ms; ~1 s before guests yielded (`cargo
/// bench -p drover --bench fairness`, 2026-12-02). The price: slow guests get half the
/// cores even when healthy devices leave the rest idle.
///
/// The slow lane runs at the same priority as the pool. At nice +10 (with as many threads)
/// the same bench measured 0.7-5 ms, but a slow guest then got a tenth of a core whenever
/// the pool was busy, so a looping guest ran into the wall-clock bound (`503 overloaded`, no
/// step toward a quarantine) instead of its CPU budget (a `timeout`), and was never
/// quarantined.
pub struct ActorPool {
    runtime: Option<tokio::runtime::Runtime>,
    slow: Option<tokio::runtime::Runtime>,
}

impl ActorPool {
    /// Starts `threads` worker threads named `drover-actor`, and `slow_threads` for the slow
    /// lane, `drover-slow` (at least one each).
    pub fn new(threads: usize, slow_threads: usize) -> std::io::Result<ActorPool> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("drover-actor")
            .enable_time()
            .build()?;
        let slow = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(slow_threads.max(1))
            .thread_name("drover-slow")
            // A slow device's event arrives from the pool, into the global queue, which a
            // worker otherwise looks at once every 31 tasks it runs: behind guests that each
            // run a tick (10 ms) before yielding, that was a wait of ~0.5 s.
            .global_queue_interval(1)
            .enable_time()
            .build()?;
        Ok(ActorPool {
            runtime: Some(runtime),
            slow: Some(slow),
        })
    }

    /// A handle to spawn onto the pool.
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.runtime {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }

    /// A handle to spawn onto the slow lane.
    pub fn slow_lane(&self) -> tokio::runtime::Handle {
        match &self.slow {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for ActorPool {
    fn drop(&mut self) {
        // A runtime may not be dropped (which blocks) from async code: let it go in the
        // background. Actors are drained by `Runtime::shutdown` before this.
        for rt in [self.runtime.take(), self.slow.take()]
            .into_iter()
            .flatten()
        {
            rt.shutdown_background();
        }
    }
}
