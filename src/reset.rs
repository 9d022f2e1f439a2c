//! An operator confirms that the store lost its revocation state (flushed or evicted while
//! no replica remembered it), so replicas may trust the store again.

use serde_json::json;

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::error::BrokerError;

impl Broker {
    /// Sets the store's generation if it is absent, so waiting replicas become ready.
    /// Returns whether there was anything to confirm.
    pub async fn confirm_store_reset(
        &self,
        actor: &str,
        source_ip: Option<String>,
    ) -> Result<bool, BrokerError> {
        if self
            .store
            .epoch()
            .await
            .map_err(|e| self.fail(e))?
            .is_some()
        {
            return Ok(false);
        }
        let fresh = crate::domain::random_id("gen_").map_err(|e| self.fail(e))?;
        self.record(
            Event::Admin,
            audit::Entry {
                decision: Some("allow"),
                subject: Some(actor.to_string()),
                reason: "store reset confirmed: revocations the store lost are not restored".into(),
                source_ip,
                detail: Some(json!({"action": "confirm_store_reset"})),
                ..audit::Entry::default()
            },
        )?;
        self.store
            .init_epoch(&fresh)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(true)
    }
}
