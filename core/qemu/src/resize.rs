//! New resources for a running VM: memory plugged into or out of its virtio-mem region and
//! CPUs plugged in through QMP, CPUs taken on or off line in the guest through its agent, the
//! balloon set to the memory it keeps. What the VM cannot have while it runs is refused with
//! the reason, before anything changes.

use std::time::{Duration, Instant};

use cloud48_driver::{DriverError, MachineShape, activity};
use cloud48_model::Resources;

use crate::machine::files;
use crate::{QemuDriver, Record, control, permanent, shape};

/// How long a guest may take to see a CPU plugged in.
const CPU_ARRIVAL: Duration = Duration::from_secs(60);
/// How long a guest may take to give back memory plugged into its region.
const MEMORY_RETURN: Duration = Duration::from_secs(60);

impl QemuDriver {
    /// The running VM's shape as its QEMU has it now: what it booted with (its record) and the
    /// memory and CPUs plugged in since (as QEMU says).
    pub(crate) async fn shape_now(&self, r: &Record) -> Result<MachineShape, DriverError> {
        let mut s = r
            .shape
            .clone()
            .unwrap_or_else(|| shape::fixed(&r.spec.resources));
        let qmp = self.file(&r.spec.guest_id, files::QMP);
        s.plugged_memory_mb = control::plugged_memory(&qmp, shape::MEMORY_DEVICE)
            .await
            .map_err(permanent)?;
        s.cpus = control::cpu_places(&qmp).await.map_err(permanent)?.plugged;
        Ok(s)
    }

    /// Gives running `r` the resources `to`, or says why it cannot have them while it runs.
    pub(crate) async fn resize(&self, r: &Record, to: &Resources) -> Result<(), DriverError> {
        let guest = &r.spec.guest_id;
        let now = self.shape_now(r).await?;
        let plan = shape::plan(guest, &now, to).map_err(permanent)?;
        let qmp = self.file(guest, files::QMP);
        let qga = self.file(guest, files::QGA);
        // The guest's agent must answer before anything is plugged in.
        let before = control::ga_vcpus(&qga).await.map_err(|e| {
            permanent(format!(
                "VM {guest} cannot change its CPUs while it runs: {e}; stop and start it to \
                 boot with what it asks for"
            ))
        })?;
        if plan.plugged_memory_mb != now.plugged_memory_mb {
            control::plug_memory(&qmp, shape::MEMORY_DEVICE, plan.plugged_memory_mb)
                .await
                .map_err(|e| permanent(format!("VM {guest}: cannot plug memory in: {e}")))?;
        }
        if plan.plug_cpus > 0 {
            self.plug_cpus(guest, plan.plug_cpus, before.len()).await?;
        }
        self.online_cpus(guest, plan.online).await?;
        // The balloon takes back only what the VM has below what it booted with, once nothing
        // is plugged into its region (QEMU sizes the balloon against the memory present).
        let keep = if plan.memory_mb >= now.boot_memory_mb {
            now.max_memory_mb
        } else {
            self.unplugged(guest).await?;
            plan.memory_mb
        };
        control::qmp(
            &qmp,
            qapi::qmp::balloon {
                value: (keep << 20) as i64,
            },
        )
        .await
        .map_err(permanent)?;
        activity::report(&format!(
            "VM {guest} now runs on {} vCPUs with {} MiB",
            plan.online, plan.memory_mb
        ));
        Ok(())
    }

    /// Waits until the guest has given back all memory plugged into its region.
    async fn unplugged(&self, guest: &str) -> Result<(), DriverError> {
        let qmp = self.file(guest, files::QMP);
        let started = Instant::now();
        loop {
            let left = control::memory_present(&qmp, shape::MEMORY_DEVICE)
                .await
                .map_err(permanent)?;
            if left == 0 {
                return Ok(());
            }
            if started.elapsed() > MEMORY_RETURN {
                return Err(permanent(format!(
                    "VM {guest} still holds {left} MiB of the memory plugged in while it ran, \
                     {MEMORY_RETURN:?} after it was asked to give it back (in use in the guest); \
                     ask for more, or stop and start it"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Plugs `count` CPUs into `guest`, which saw `seen` CPUs, and waits until it sees them.
    async fn plug_cpus(&self, guest: &str, count: u64, seen: usize) -> Result<(), DriverError> {
        let qmp = self.file(guest, files::QMP);
        let places = control::cpu_places(&qmp).await.map_err(permanent)?;
        let taken: Vec<&str> = places.plugged.iter().map(|c| c.id.as_str()).collect();
        let mut ids = (0..)
            .map(shape::cpu_id)
            .filter(|id| !taken.contains(&id.as_str()));
        for (driver, place) in places.free.into_iter().take(count as usize) {
            let id = ids.next().expect("endless");
            let props = place
                .iter()
                .map(|(name, index)| (name.clone(), serde_json::Value::from(*index)));
            control::qmp(
                &qmp,
                qapi::qmp::device_add::new(driver, Some(id), None, props),
            )
            .await
            .map_err(|e| permanent(format!("VM {guest}: cannot plug in a CPU: {e}")))?;
        }
        let wanted = seen + count as usize;
        let qga = self.file(guest, files::QGA);
        let started = Instant::now();
        loop {
            let now = control::ga_vcpus(&qga).await.map_err(permanent)?.len();
            if now >= wanted {
                return Ok(());
            }
            if started.elapsed() > CPU_ARRIVAL {
                return Err(permanent(format!(
                    "VM {guest} sees {now} of its {wanted} CPUs {CPU_ARRIVAL:?} after they were \
                     plugged in (its kernel takes no CPUs while it runs?); stop and start it to \
                     boot with them"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes the guest's first `online` CPUs on line and the others off.
    async fn online_cpus(&self, guest: &str, online: u64) -> Result<(), DriverError> {
        let qga = self.file(guest, files::QGA);
        let mut cpus = control::ga_vcpus(&qga).await.map_err(permanent)?;
        cpus.sort_by_key(|c| c.0);
        let mut change = Vec::new();
        for (i, &(id, is_online, can_offline)) in cpus.iter().enumerate() {
            let want = (i as u64) < online;
            if want == is_online {
                continue;
            }
            if !want && !can_offline {
                return Err(permanent(format!(
                    "VM {guest} cannot give up its CPU {id} while it runs (its kernel keeps it); \
                     stop and start it to boot with {online} vCPUs"
                )));
            }
            change.push((id, want));
        }
        if change.is_empty() {
            return Ok(());
        }
        control::ga_set_vcpus(&qga, &change)
            .await
            .map_err(|e| permanent(format!("VM {guest}: {e}")))
    }
}
