use super::*;

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn leading_with(leases: &[(i64, i64)], now: Duration) -> Lessor {
    let mut l = Lessor::default();
    for &(id, ttl) in leases {
        l.handle_granted(id, ttl);
    }
    l.handle_leading(now, 1);
    l
}

#[test]
fn a_lease_is_revoked_when_its_ttl_runs_out_and_not_before() {
    let mut l = leading_with(&[(7, 10)], s(100));
    assert_eq!(l.poll_effect(s(109)), None);
    assert_eq!(l.poll_timeout(), Some(s(110)), "the expiry comes before the next checkpoint");
    assert_eq!(l.poll_effect(s(110)), Some(LeaseEffect::Revoke(7)));
    assert_eq!(l.poll_effect(s(111)), None, "proposed once");
    l.handle_revoke_failed(7);
    assert_eq!(l.poll_effect(s(111)), Some(LeaseEffect::Revoke(7)), "a failed proposal is retried");
    l.handle_revoked(7);
    assert!(l.is_empty());
}

#[test]
fn a_lease_granted_while_leading_runs_from_the_next_tick() {
    let mut l = leading_with(&[], s(0));
    l.handle_granted(3, 4);
    assert_eq!(l.poll_effect(s(2)), None);
    assert_eq!(l.poll_effect(s(5)), None);
    assert_eq!(l.poll_effect(s(6)), Some(LeaseEffect::Revoke(3)));
}

#[test]
fn keep_alives_renew_only_while_leading_and_before_expiry() {
    let mut l = leading_with(&[(1, 30)], s(0));
    assert_eq!(l.renew(s(4), 1), Renewal::Renewed { ttl: 30 });
    assert_eq!(l.poll_effect(s(13)), Some(LeaseEffect::Checkpoint(vec![(1, 21_000)])));
    l.handle_checkpointed(&[(1, 21_000)]);
    assert_eq!(l.poll_effect(s(13)), None);
    assert_eq!(l.renew(s(13), 1), Renewal::ClearCheckpointFirst);
    l.handle_checkpointed(&[(1, 0)]);
    assert_eq!(l.renew(s(13), 1), Renewal::Renewed { ttl: 30 });
    assert_eq!(l.renew(s(13), 2), Renewal::NotFound);
    assert_eq!(l.time_to_live(s(15), 1), Some((30, 28)));
    assert_eq!(l.poll_effect(s(42)), None, "renewed at 13: runs out at 43, not 34");
    assert_eq!(l.poll_effect(s(43)), Some(LeaseEffect::Revoke(1)));
    assert_eq!(l.renew(s(43), 1), Renewal::NotFound, "a lease being revoked is gone");
    l.handle_following();
    assert_eq!(l.renew(s(23), 1), Renewal::NotLeading);
    assert_eq!(l.poll_effect(s(100)), None, "a follower decides nothing");
    assert_eq!(l.poll_timeout(), None);
}

#[test]
fn a_new_leader_counts_checkpointed_remaining_times_or_whole_ttls_from_its_promotion() {
    let mut l =
        Lessor::load([(1, StoredLease { ttl: 60, remaining_ms: 3_000 }), (2, StoredLease { ttl: 5, remaining_ms: 0 })]);
    l.handle_leading(s(1000), 4);
    assert_eq!(l.poll_effect(s(1002)), None);
    assert_eq!(l.poll_effect(s(1003)), Some(LeaseEffect::Revoke(1)));
    assert_eq!(l.poll_effect(s(1004)), None);
    assert_eq!(l.poll_effect(s(1005)), Some(LeaseEffect::Revoke(2)));
}

#[test]
fn leading_again_forgets_the_old_deadlines() {
    let mut l = leading_with(&[(1, 10)], s(0));
    l.handle_following();
    // Another node led meanwhile and renewed the lease; this one cannot know.
    l.handle_leading(s(50), 3);
    assert_eq!(l.poll_effect(s(59)), None, "the deadline counts from the promotion");
    assert_eq!(l.poll_effect(s(60)), Some(LeaseEffect::Revoke(1)));
    let mut again = l.clone();
    again.handle_leading(s(70), 3);
    assert_eq!(again.poll_effect(s(70)), None, "the same term changes nothing: revocation is under way");
}

#[test]
fn checkpoints_cover_long_leases_in_bounded_rotating_batches() {
    let n = CHECKPOINT_BATCH_MAX as i64 + 10;
    let mut leases: Vec<(i64, i64)> = (1..=n).map(|id| (id, 600)).collect();
    leases.push((n + 1, 3));
    leases.push((n + 2, 12));
    let mut l = leading_with(&leases, s(0));
    assert_eq!(l.poll_effect(CHECKPOINT_INTERVAL), Some(LeaseEffect::Revoke(n + 1)), "expiry comes first");
    let Some(LeaseEffect::Checkpoint(first)) = l.poll_effect(CHECKPOINT_INTERVAL) else { panic!("no checkpoint") };
    assert_eq!(first.len(), CHECKPOINT_BATCH_MAX);
    assert_eq!(first[0], (1, 595_000));
    assert!(first.iter().all(|(id, _)| *id != n + 1), "a lease being revoked is left out");
    let Some(LeaseEffect::Checkpoint(second)) = l.poll_effect(CHECKPOINT_INTERVAL * 2) else { panic!() };
    assert_eq!(second.first().map(|c| c.0), Some(CHECKPOINT_BATCH_MAX as i64 + 1), "continues after the first batch");
    assert!(second.len() <= CHECKPOINT_BATCH_MAX);
    assert!(second.iter().all(|(id, _)| *id != n + 2), "a lease ending before the next checkpoint is left out");
}
