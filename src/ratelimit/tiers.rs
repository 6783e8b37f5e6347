//! Rate-limit tiers: which tier a gRPC method belongs to, and each tier's quota.
//!
//! Pure: no I/O, no clocks. A method is matched exactly first, then by its service,
//! then falls to the default tier, so a new RPC is never unlimited.

use std::time::Duration;

/// A group of methods sharing one limit per key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Bot entry points: `Coordinator/HandleWebhook` and `Coordinator/DispatchJob`.
    Webhook,
    /// The rest of the `Coordinator` service.
    Coordinator,
    /// `grpc.health.v1.Health`, `Coordinator/Health` and server reflection
    /// (what tools such as grpcurl ask before any call, and nothing an
    /// admin call's budget should pay for).
    Health,
    /// Federation wire methods called by peers (`RequestConnection`,
    /// `NotifyConnection`, `ExecuteCommand`, `Ping`), and the calls between
    /// replicas (`mosaic.replica.v1.Replica`).
    Federation,
    /// Everything else (admin methods, agents, unknown methods).
    Default,
}

impl Tier {
    /// Every tier, in the order of [`Tier::index`].
    pub const ALL: [Tier; 5] = [
        Tier::Webhook,
        Tier::Coordinator,
        Tier::Health,
        Tier::Federation,
        Tier::Default,
    ];

    /// A dense index, for per-tier arrays.
    pub fn index(self) -> usize {
        match self {
            Tier::Webhook => 0,
            Tier::Coordinator => 1,
            Tier::Health => 2,
            Tier::Federation => 3,
            Tier::Default => 4,
        }
    }

    /// The tier's name in configuration, logs, Redis keys and error details.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Webhook => "webhook",
            Tier::Coordinator => "coordinator",
            Tier::Health => "health",
            Tier::Federation => "federation",
            Tier::Default => "default",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The tier of a gRPC path `/package.Service/Method`: exact method, then service,
/// then [`Tier::Default`].
pub fn tier_for(path: &str) -> Tier {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Tier::Default;
    };
    match (service, method) {
        ("mosaic.coordinator.v1.Coordinator", "HandleWebhook" | "DispatchJob") => Tier::Webhook,
        ("mosaic.coordinator.v1.Coordinator", "Health") => Tier::Health,
        (
            "mosaic.federation.v1.Federation",
            "RequestConnection" | "NotifyConnection" | "ExecuteCommand" | "WatchCommand" | "Ping",
        ) => Tier::Federation,
        ("mosaic.replica.v1.Replica", _) => Tier::Federation,
        ("mosaic.coordinator.v1.Coordinator", _) => Tier::Coordinator,
        (
            "grpc.health.v1.Health"
            | "grpc.reflection.v1.ServerReflection"
            | "grpc.reflection.v1alpha.ServerReflection",
            _,
        ) => Tier::Health,
        _ => Tier::Default,
    }
}

/// The quota of every tier: `limit` calls per `window` for each key, as GCRA
/// (a burst of `limit`, then one more every `window / limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierLimits {
    window: Duration,
    limits: [u32; 5],
}

/// The one quota of one tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierQuota {
    /// Calls allowed per window (the burst), at least 1.
    pub limit: u32,
    /// The window, at least one second.
    pub window: Duration,
}

impl TierQuota {
    /// Time to earn back one call: `window / limit`, at least one microsecond.
    pub fn emission_interval(&self) -> Duration {
        (self.window / self.limit.max(1)).max(Duration::from_micros(1))
    }
}

impl TierLimits {
    /// Limits per tier. Returns `None` when the window is under a second or a limit
    /// is zero: such a configuration is refused at start, never silently "fixed".
    pub fn new(window: Duration, limits_by_tier: [(Tier, u32); 5]) -> Option<TierLimits> {
        if window < Duration::from_secs(1) {
            return None;
        }
        let mut limits = [0u32; 5];
        for (tier, limit) in limits_by_tier {
            limits[tier.index()] = limit;
        }
        if limits.contains(&0) {
            return None;
        }
        Some(TierLimits { window, limits })
    }

    /// The quota of `tier`.
    pub fn quota(&self, tier: Tier) -> TierQuota {
        TierQuota {
            limit: self.limits[tier.index()],
            window: self.window,
        }
    }

    /// The window every limit counts over.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Each limit divided among `replicas` daemons (rounded down, at least 1): the
    /// in-memory fallback while Redis is unusable, so the fleet as a whole stays
    /// near the shared limit and never becomes unlimited.
    pub fn divided_among(&self, replicas: u32) -> TierLimits {
        let replicas = replicas.max(1);
        TierLimits {
            window: self.window,
            limits: self.limits.map(|limit| (limit / replicas).max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_route_by_exact_method_then_service_then_default() {
        let cases = [
            (
                "/mosaic.coordinator.v1.Coordinator/HandleWebhook",
                Tier::Webhook,
            ),
            (
                "/mosaic.coordinator.v1.Coordinator/DispatchJob",
                Tier::Webhook,
            ),
            ("/mosaic.coordinator.v1.Coordinator/Health", Tier::Health),
            (
                "/mosaic.coordinator.v1.Coordinator/CreateJob",
                Tier::Coordinator,
            ),
            (
                "/mosaic.coordinator.v1.Coordinator/SomethingNew",
                Tier::Coordinator,
            ),
            ("/grpc.health.v1.Health/Check", Tier::Health),
            ("/grpc.health.v1.Health/Watch", Tier::Health),
            (
                "/mosaic.federation.v1.Federation/ExecuteCommand",
                Tier::Federation,
            ),
            ("/mosaic.federation.v1.Federation/Ping", Tier::Federation),
            ("/mosaic.replica.v1.Replica/WatchAgent", Tier::Federation),
            (
                "/mosaic.federation.v1.Federation/RequestConnection",
                Tier::Federation,
            ),
            (
                "/mosaic.federation.v1.Federation/NotifyConnection",
                Tier::Federation,
            ),
            ("/mosaic.federation.v1.Federation/RotateKeys", Tier::Default),
            ("/mosaic.agent.v1.AgentControl/Spawn", Tier::Default),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Tier::Health,
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                Tier::Health,
            ),
            ("/unknown.Service/Method", Tier::Default),
            ("garbage", Tier::Default),
            ("", Tier::Default),
        ];
        for (path, tier) in cases {
            assert_eq!(tier_for(path), tier, "{path}");
        }
    }

    fn limits(window_secs: u64, limit: u32) -> Option<TierLimits> {
        TierLimits::new(
            Duration::from_secs(window_secs),
            Tier::ALL.map(|tier| (tier, limit)),
        )
    }

    #[test]
    fn zero_limits_and_sub_second_windows_are_refused() {
        assert!(limits(60, 0).is_none());
        assert!(limits(0, 10).is_none());
        assert!(limits(60, 10).is_some());
    }

    #[test]
    fn fallback_divides_and_never_reaches_zero() {
        let limits = limits(60, 100).expect("limits");
        assert_eq!(limits.divided_among(3).quota(Tier::Webhook).limit, 33);
        assert_eq!(limits.divided_among(1000).quota(Tier::Webhook).limit, 1);
        assert_eq!(limits.divided_among(0).quota(Tier::Webhook).limit, 100);
    }

    #[test]
    fn emission_interval_is_window_over_limit() {
        let quota = limits(60, 100).expect("limits").quota(Tier::Health);
        assert_eq!(quota.emission_interval(), Duration::from_millis(600));
    }
}
