//! The gRPC methods this server serves, listed once from the descriptor sets it
//! also serves by reflection, each classified once: who may call it
//! ([`Requirement`]), its rate-limit [`Tier`], and its metrics labels.
//!
//! A call's path is looked up here once, by the front door, instead of being
//! split and matched against the service tables again by each part that
//! needs to know something of it. A path that is not listed (a method no
//! service of ours has) is classified by the same tables, [`requirement_for`]
//! and [`tier_for`], at call time: the answers never differ, only their cost.

use std::collections::HashMap;
use std::sync::LazyLock;

use prost::Message as _;

use crate::auth::{Requirement, requirement_for};
use crate::ratelimit::tiers::{Tier, tier_for};

/// One method this server serves.
#[derive(Debug)]
pub struct Method {
    /// `/package.Service/Method`.
    path: Box<str>,
    /// Where the service's name ends in `path`.
    slash: usize,
    /// Who may call it.
    pub requirement: Requirement,
    /// Its rate-limit tier.
    pub tier: Tier,
    /// Its position in [`all`]: tables kept beside this one (the metrics'
    /// series) are indexed by it.
    pub index: usize,
}

impl Method {
    /// `package.Service`.
    pub fn service(&self) -> &str {
        &self.path[1..self.slash]
    }

    /// The method's own name.
    pub fn name(&self) -> &str {
        &self.path[self.slash + 1..]
    }
}

/// How one call's path is treated.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// Who may call it; `None` for a service that is not ours.
    pub requirement: Option<Requirement>,
    /// Its rate-limit tier.
    pub tier: Tier,
}

impl Route {
    /// The route of a call to `path`, whose served method is `method` (as
    /// [`lookup`] found it, so that a caller that wants both looks once).
    pub fn of(method: Option<&Method>, path: &str) -> Route {
        match method {
            Some(method) => Route {
                requirement: Some(method.requirement),
                tier: method.tier,
            },
            None => Route {
                requirement: requirement_for(path),
                tier: tier_for(path),
            },
        }
    }
}

/// The served method at `path`, if there is one.
pub fn lookup(path: &str) -> Option<&'static Method> {
    let served = &*SERVED;
    served
        .by_path
        .get(path)
        .map(|&index| &served.methods[index])
}

/// Every served method, in the order of [`Method::index`].
pub fn all() -> &'static [Method] {
    &SERVED.methods
}

static SERVED: LazyLock<Served> = LazyLock::new(Served::from_descriptors);

struct Served {
    methods: Vec<Method>,
    by_path: HashMap<Box<str>, usize>,
}

impl Served {
    /// Every method of the descriptor sets the server registers, that the
    /// service tables know. The sets are constants of this build: a set that
    /// did not decode would leave its methods to the tables at call time.
    fn from_descriptors() -> Served {
        let sets = [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut served = Served {
            methods: Vec::new(),
            by_path: HashMap::new(),
        };
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let service_name = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in &service.method {
                        served.add(&service_name, method.name());
                    }
                }
            }
        }
        served
    }

    fn add(&mut self, service: &str, method: &str) {
        let path = format!("/{service}/{method}");
        let Some(requirement) = requirement_for(&path) else {
            return;
        };
        if self.by_path.contains_key(path.as_str()) {
            return;
        }
        let index = self.methods.len();
        self.by_path.insert(path.clone().into_boxed_str(), index);
        self.methods.push(Method {
            tier: tier_for(&path),
            requirement,
            slash: service.len() + 1,
            path: path.into_boxed_str(),
            index,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_of_ours_is_listed_with_what_its_tables_say() {
        for path in [
            "/mosaic.coordinator.v1.Coordinator/GetJob",
            "/mosaic.coordinator.v1.Coordinator/Health",
            "/mosaic.federation.v1.Federation/ExecuteCommand",
            "/mosaic.agent.v1.AgentControl/Spawn",
            "/mosaic.replica.v1.Replica/KillAgent",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let method = lookup(path).unwrap_or_else(|| panic!("{path} is served"));
            assert_eq!(Some(method.requirement), requirement_for(path), "{path}");
            assert_eq!(method.tier, tier_for(path), "{path}");
            assert_eq!(format!("/{}/{}", method.service(), method.name()), path);
            assert!(std::ptr::eq(&all()[method.index], method));
        }
    }

    #[test]
    fn a_path_no_service_has_is_routed_by_the_tables() {
        for path in [
            "/mosaic.federation.v1.Federation/SomethingNew",
            "/scanner.Probe/Anything",
            "/",
            "",
        ] {
            let route = Route::of(lookup(path), path);
            assert!(lookup(path).is_none(), "{path}");
            assert_eq!(route.requirement, requirement_for(path), "{path}");
            assert_eq!(route.tier, tier_for(path), "{path}");
        }
    }

    #[test]
    fn every_listed_method_agrees_with_the_tables() {
        assert!(all().len() > 40, "{} methods", all().len());
        for method in all() {
            let path = format!("/{}/{}", method.service(), method.name());
            let route = Route::of(lookup(&path), &path);
            assert_eq!(route.requirement, requirement_for(&path), "{path}");
            assert_eq!(route.tier, tier_for(&path), "{path}");
        }
    }
}
