//! The workflow engine: order, compensation, errors, sub-workflows.

use std::sync::{Arc, Mutex};

use lockstep::workflow::{
    Container, StepError, StepResponse, create_step, create_step_with_compensation, create_workflow,
};

type Log = Arc<Mutex<Vec<String>>>;

/// A step that logs its invoke and compensation, and fails when asked to.
fn logged(
    name: &'static str,
    log: &Log,
    fail: bool,
    fail_compensation: bool,
) -> lockstep::workflow::FnStep<u32, u32, u32> {
    let (l1, l2) = (Arc::clone(log), Arc::clone(log));
    create_step_with_compensation(
        name,
        move |_ctx, n: u32| {
            let log = Arc::clone(&l1);
            async move {
                log.lock().unwrap().push(format!("invoke {name}"));
                if fail {
                    return Err::<StepResponse<u32, u32>, StepError>(
                        format!("{name} failed").into(),
                    );
                }
                Ok(StepResponse::new(n + 1, n))
            }
        },
        move |_ctx, n: u32| {
            let log = Arc::clone(&l2);
            async move {
                log.lock().unwrap().push(format!("compensate {name}({n})"));
                if fail_compensation {
                    return Err::<(), StepError>(format!("{name} could not be undone").into());
                }
                Ok(())
            }
        },
    )
}

/// Steps a, b, c adding 1 each, logged in `log`; c fails, and so does b's
/// compensation if `b_compensation_fails`.
fn three_steps(log: &Log, b_compensation_fails: bool) -> lockstep::workflow::Workflow<u32, u32> {
    let (a, b, c) = (
        logged("a", log, false, false),
        logged("b", log, false, b_compensation_fails),
        logged("c", log, true, false),
    );
    create_workflow("three", move |run, n: u32| {
        let (a, b, c) = (a.clone(), b.clone(), c.clone());
        async move {
            let n = run.step(&a, n).await?;
            let n = run.step(&b, n).await?;
            run.step(&c, n).await
        }
    })
}

/// Steps run in order; a failure compensates the completed steps in reverse
/// order and returns the original error.
#[tokio::test]
async fn a_failure_compensates_completed_steps_in_reverse() {
    let log: Log = Arc::default();
    let e = three_steps(&log, false)
        .run(&Container::new(), 10)
        .await
        .unwrap_err();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "invoke a",
            "invoke b",
            "invoke c",
            "compensate b(11)",
            "compensate a(10)"
        ]
    );
    assert_eq!(e.error().to_string(), "c failed");
    assert_eq!(e.failed_step.as_deref(), Some("c"));
    assert_eq!(e.compensated, ["b", "a"]);
    assert!(e.compensation_failures.is_empty());
    assert!(e.to_string().contains("at step \"c\": c failed"), "{e}");
}

/// A compensation that fails is reported with the original error, and the
/// other compensations still run.
#[tokio::test]
async fn compensation_failures_are_reported_not_swallowed() {
    let log: Log = Arc::default();
    let e = three_steps(&log, true)
        .run(&Container::new(), 0)
        .await
        .unwrap_err();
    assert_eq!(
        e.error().to_string(),
        "c failed",
        "the original error stays"
    );
    assert_eq!(e.compensation_failures.len(), 1);
    assert_eq!(e.compensation_failures[0].step, "b");
    assert_eq!(
        e.compensation_failures[0].error.to_string(),
        "b could not be undone"
    );
    assert!(log.lock().unwrap().contains(&"compensate a(0)".to_string()));
    assert!(
        e.to_string()
            .contains("1 compensation(s) failed: [b: b could not be undone]"),
        "{e}"
    );
}

/// A successful run returns the output and a unique run id; nothing is
/// compensated.
#[tokio::test]
async fn runs_have_unique_ids_and_outputs() {
    let log: Log = Arc::default();
    let a = logged("a", &log, false, false);
    let wf = create_workflow("one", move |run, n: u32| {
        let a = a.clone();
        async move { run.step(&a, n).await }
    });
    let first = wf.run(&Container::new(), 1).await.unwrap();
    let second = wf.run(&Container::new(), 1).await.unwrap();
    assert_eq!(first.output, 2);
    assert_ne!(first.run_id, second.run_id);
    assert_eq!(first.run_id.len(), 32);
    let third = wf
        .run_with_id(&Container::new(), "request-7", 5)
        .await
        .unwrap();
    assert_eq!(third.run_id, "request-7");
    assert!(log.lock().unwrap().iter().all(|l| l.starts_with("invoke")));
}

/// Steps resolve services from the run's container, and see the run id.
#[tokio::test]
async fn steps_resolve_services_and_see_their_run() {
    let step = create_step("greet", |ctx, name: String| async move {
        let greeting: String = ctx.container().resolve("greeting")?;
        Ok::<_, StepError>(format!(
            "{greeting}, {name} (run {}, step {})",
            ctx.run_id(),
            ctx.step()
        ))
    });
    let wf = create_workflow("greet", move |run, name: String| {
        let step = step.clone();
        async move { run.step(&step, name).await }
    });
    let container = Container::new().with("greeting", "hello".to_string());
    let done = wf
        .run_with_id(&container, "r1", "ada".into())
        .await
        .unwrap();
    assert_eq!(done.output, "hello, ada (run r1, step greet)");
    let e = wf.run(&Container::new(), "ada".into()).await.unwrap_err();
    assert!(
        e.error()
            .to_string()
            .contains("no service is registered under \"greeting\"")
    );
}

/// A sub-workflow that succeeds joins its compensations to the parent: a
/// later failure of the parent undoes them too, in reverse order.
#[tokio::test]
async fn a_completed_sub_workflow_is_undone_when_the_parent_fails() {
    let log: Log = Arc::default();
    let (s1, s2) = (
        logged("s1", &log, false, false),
        logged("s2", &log, false, false),
    );
    let sub = create_workflow("sub", move |run, n: u32| {
        let (s1, s2) = (s1.clone(), s2.clone());
        async move {
            assert!(run.is_nested());
            let n = run.step(&s1, n).await?;
            run.step(&s2, n).await
        }
    });
    let (p1, p2) = (
        logged("p1", &log, false, false),
        logged("p2", &log, true, false),
    );
    let parent = create_workflow("parent", move |run, n: u32| {
        let (p1, p2, sub) = (p1.clone(), p2.clone(), sub.clone());
        async move {
            let n = run.step(&p1, n).await?;
            let n = run.run_sub(&sub, n).await?;
            run.step(&p2, n).await
        }
    });
    let e = parent.run(&Container::new(), 0).await.unwrap_err();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "invoke p1",
            "invoke s1",
            "invoke s2",
            "invoke p2",
            "compensate s2(2)",
            "compensate s1(1)",
            "compensate p1(0)"
        ]
    );
    assert_eq!(e.compensated, ["sub", "p1"]);
}

/// A sub-workflow that fails is compensated at once; its error reaches the
/// parent, which can handle it, or fail and compensate its own steps.
#[tokio::test]
async fn a_failed_sub_workflow_is_compensated_at_once() {
    let log: Log = Arc::default();
    let (s1, s2) = (
        logged("s1", &log, false, false),
        logged("s2", &log, true, false),
    );
    let sub = create_workflow("sub", move |run, n: u32| {
        let (s1, s2) = (s1.clone(), s2.clone());
        async move {
            let n = run.step(&s1, n).await?;
            run.step(&s2, n).await
        }
    });
    let p1 = logged("p1", &log, false, false);
    let parent = create_workflow("parent", move |run, n: u32| {
        let (p1, sub) = (p1.clone(), sub.clone());
        async move {
            let n = run.step(&p1, n).await?;
            run.run_sub(&sub, n).await
        }
    });
    let e = parent.run(&Container::new(), 0).await.unwrap_err();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "invoke p1",
            "invoke s1",
            "invoke s2",
            "compensate s1(1)",
            "compensate p1(0)"
        ]
    );
    assert_eq!(e.failed_step.as_deref(), Some("sub/s2"));
    assert_eq!(e.error().to_string(), "s2 failed");
}

/// A panicking step: the completed steps are compensated, then the panic
/// continues.
#[tokio::test]
async fn a_panic_compensates_then_resumes() {
    let log: Log = Arc::default();
    let a = logged("a", &log, false, false);
    let boom = create_step("boom", |_ctx, _n: u32| async move {
        if true {
            panic!("step panicked");
        }
        Ok::<u32, StepError>(0)
    });
    let wf = create_workflow("panics", move |run, n: u32| {
        let (a, boom) = (a.clone(), boom.clone());
        async move {
            let n = run.step(&a, n).await?;
            run.step(&boom, n).await
        }
    });
    let joined = tokio::spawn(async move { wf.run(&Container::new(), 0).await }).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(*log.lock().unwrap(), ["invoke a", "compensate a(0)"]);
}
