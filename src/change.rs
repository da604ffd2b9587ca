//! The model of a change (one of three "events" things: `events` is the
//! SQS/SNS transport, `fs::apply_events` applies changes inside the core):
//! what SSM says happened to one parameter, as the
//! filesystem core applies it. It knows no transport: `events` reads these
//! from SQS (directly, or through SNS) above the core, and `fs` applies them
//! below it, so neither layer knows the other's details.

use std::time::SystemTime;

/// What happened to a parameter, as SSM names it in the event's detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
    /// A label moved (`LabelParameterVersion`): the current value is unchanged.
    Label,
    /// An operation this version does not know; treated as a possible change.
    Other,
}

/// One "Parameter Store Change" event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterEvent {
    /// EventBridge's id of the event: the same on every redelivery.
    pub id: Option<String>,
    pub name: String,
    pub operation: Operation,
    /// When the change happened (EventBridge's `time`, whole seconds).
    pub time: Option<SystemTime>,
}
