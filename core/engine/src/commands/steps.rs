//! The steps of the multi-step container commands. The queue persists a step as its number;
//! a command at a number its kind does not have (written by a newer core, or damaged) fails
//! with a message that names it, instead of running some other step.

use crate::entities::command;
use crate::queue::StepError;

macro_rules! steps {
    ($(#[$meta:meta])* $name:ident of $kind:literal { $($(#[$vmeta:meta])* $variant:ident = $n:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $n),+
        }

        impl $name {
            /// The step `cmd` is at.
            pub fn of(cmd: &command::Model) -> Result<Self, StepError> {
                match cmd.step {
                    $($n => Ok($name::$variant),)+
                    other => Err(StepError::Permanent(format!(
                        "command {} ({}): step {other} is not a step of {} this core knows",
                        cmd.id, cmd.kind, $kind
                    ))),
                }
            }

            /// Its number, as the queue persists it.
            pub fn number(self) -> i32 {
                self as i32
            }
        }
    };
}

steps!(
    /// `container.create`.
    CreateStep of "container.create" {
        /// Place: reserve capacity with a dummy.
        Place = 0,
        /// Create (or import) and start the guest; the container takes the dummy's place.
        Make = 1,
    }
);

steps!(
    /// `container.create_many`.
    CreateManyStep of "container.create_many" {
        /// Place every container: claims and dummies.
        Place = 0,
        /// Make the guests and commit them.
        Make = 1,
    }
);

steps!(
    /// `container.update`.
    UpdateStep of "container.update" {
        /// Reserve the growth with a dummy.
        Reserve = 0,
        /// Resize the guest, then settle the ledger.
        Resize = 1,
        /// The growth expired meanwhile and the server has no room: give the guest its old
        /// size back and fail.
        Undo = 2,
    }
);

steps!(
    /// `container.clone`.
    CloneStep of "container.clone" {
        /// Make the copy's row and place it.
        Place = 0,
        /// Stop the source.
        StopSource = 1,
        /// Copy the disk to the copy's server.
        Copy = 2,
        /// Start both again if the source ran.
        Finish = 3,
    }
);

steps!(
    /// `container.migrate`.
    MigrateStep of "container.migrate" {
        /// Place on the target.
        Place = 0,
        /// Stop on the source.
        Stop = 1,
        /// Copy to the target.
        Copy = 2,
        /// Destroy on the source and switch servers.
        Switch = 3,
        /// Start on the target if it ran.
        Start = 4,
        /// Its environment has heard of its new address (a child `environment.notify`).
        Rewired = 5,
    }
);

steps!(
    /// `environment.add`.
    AddStep of "environment.add" {
        /// `before-it-is-added` and `before-other-is-added`.
        BeforeHooks = 0,
        /// The actions they asked for.
        BeforeActions = 1,
        /// The child create.
        Create = 2,
        /// `after-it-is-added` and `after-other-is-added`.
        AfterHooks = 3,
        /// The actions they asked for.
        AfterActions = 4,
    }
);

steps!(
    /// `environment.remove`.
    RemoveStep of "environment.remove" {
        /// `before-it-is-removed`.
        BeforeHooks = 0,
        /// The actions it asked for.
        BeforeActions = 1,
        /// The child destroy.
        Destroy = 2,
        /// `after-other-is-removed`.
        AfterHooks = 3,
        /// The actions they asked for.
        AfterActions = 4,
    }
);

steps!(
    /// `environment.replace`.
    ReplaceStep of "environment.replace" {
        /// Retire the down member; the others hear it left.
        Retire = 0,
        /// The actions they asked for.
        Actions = 1,
        /// The child add of its replacement.
        Add = 2,
        /// Finish (or put the member back to down when no replacement was made).
        Finish = 3,
        /// No replacement: the others, who heard the member left, hear it is in again.
        Rejoin = 4,
        /// The actions they asked for; then the command fails, saying why.
        RejoinActions = 5,
    }
);

steps!(
    /// `plugin.upgrade`.
    UpgradeStep of "plugin.upgrade" {
        /// Convert every container's state and install the new version, in one transaction.
        Migrate = 0,
        /// Make this core's registry match (the new version in, the old one out).
        Activate = 1,
    }
);

steps!(
    /// `environment.failover`, `environment.recover` and `environment.notify`.
    NotifyStep of "environment.notify" {
        /// Run the hook for the chosen members.
        Hooks = 0,
        /// The actions it asked for.
        Actions = 1,
    }
);

/// The steps of a command that plans, then works through its plan one item per step: the
/// fan-outs (`environment.start|stop|suspend|resume|destroy`, one group of members of equal
/// priority per step) and `environment.clone` (one member per step). The step after the last
/// item finishes the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStep {
    /// Make the plan.
    Plan,
    /// Carry out item `n` of the plan (0-based), or finish when `n` is the plan's length.
    Item(usize),
}

impl PlanStep {
    /// The step `cmd` is at.
    pub fn of(cmd: &command::Model) -> Result<Self, StepError> {
        match cmd.step {
            0 => Ok(PlanStep::Plan),
            n if n > 0 => Ok(PlanStep::Item(n as usize - 1)),
            other => Err(StepError::Permanent(format!(
                "command {} ({}): step {other} is not a step this core knows",
                cmd.id, cmd.kind
            ))),
        }
    }

    /// Its number, as the queue persists it.
    pub fn number(self) -> i32 {
        match self {
            PlanStep::Plan => 0,
            PlanStep::Item(n) => n as i32 + 1,
        }
    }

    /// Item `n` of a plan of `len` items: `Some` to carry it out, `None` to finish; past the
    /// end (a damaged command) is an error naming the command.
    pub fn item<'p, T>(
        cmd: &command::Model,
        n: usize,
        plan: &'p [T],
    ) -> Result<Option<&'p T>, StepError> {
        match plan.get(n) {
            Some(item) => Ok(Some(item)),
            None if n == plan.len() => Ok(None),
            None => Err(StepError::Permanent(format!(
                "command {} ({}): step {} is past the end of its plan of {} items",
                cmd.id,
                cmd.kind,
                cmd.step,
                plan.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_number_reads_back_and_an_unknown_one_names_the_command() {
        let mut cmd = crate::commands::params::tests_support::command("container.migrate", 3);
        assert_eq!(MigrateStep::of(&cmd).unwrap(), MigrateStep::Switch);
        assert_eq!(MigrateStep::Switch.number(), 3);
        cmd.step = 9;
        let e = MigrateStep::of(&cmd).unwrap_err().to_string();
        assert_eq!(
            e,
            "command 42 (container.migrate): step 9 is not a step of container.migrate this core knows"
        );
        cmd.step = 3;
        assert!(UpdateStep::of(&cmd).is_err());
    }

    #[test]
    fn a_plan_step_numbers_its_items_from_one_and_refuses_to_run_past_the_plan() {
        let mut cmd = crate::commands::params::tests_support::command("environment.stop", 0);
        assert_eq!(PlanStep::of(&cmd).unwrap(), PlanStep::Plan);
        cmd.step = 3;
        assert_eq!(PlanStep::of(&cmd).unwrap(), PlanStep::Item(2));
        assert_eq!(PlanStep::Item(2).number(), 3);
        let plan = ["a", "b", "c"];
        assert_eq!(PlanStep::item(&cmd, 2, &plan).unwrap(), Some(&"c"));
        assert_eq!(PlanStep::item(&cmd, 3, &plan).unwrap(), None);
        cmd.step = 5;
        let e = PlanStep::item(&cmd, 4, &plan).unwrap_err().to_string();
        assert_eq!(
            e,
            "command 42 (environment.stop): step 5 is past the end of its plan of 3 items"
        );
        cmd.step = -1;
        assert!(PlanStep::of(&cmd).is_err());
    }
}
