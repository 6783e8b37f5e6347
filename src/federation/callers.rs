//! Who a wire call comes from: whether the caller's TLS key is a key of the
//! connection its header names, settled before anything that depends on that
//! connection's state is answered (step 5 of the Federation service's
//! checks). A caller that is not identified gets one refusal,
//! UNAUTHENTICATED with [`envelope::STRANGER_MESSAGE`], whatever the state
//! of that connection or its absence, so that a message naming someone
//! else's instance id learns nothing about their connections.
//!
//! Commands identify their caller in `commands::receive`. Connection
//! requests, notices and pings are identified here, before `inbound` runs its
//! own checks on them (again): the handlers call these first.

use crate::federation::envelope::{self, EnvelopeError, TrustedKey};
use crate::federation::{Federation, FederationError};
use crate::identity::PublicKey;
use crate::proto::federation as pb;

impl Federation {
    /// Steps 3 to 5 of a RequestConnection. A request for a connection that
    /// does not exist yet carries its own key and is checked by
    /// `receive_request`; one naming a sender that already has a PENDING,
    /// ACTIVE or SUSPENDED connection in that workspace must come from a key
    /// of that connection (whose caller then learns that it exists), else it
    /// is a stranger's.
    pub async fn identify_request_caller(
        &self,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
    ) -> Result<(), FederationError> {
        let parsed = envelope::parse::<pb::ConnectionRequestPayload>(sealed)?;
        parsed.check_recipient(&self.identity.current().instance_id)?;
        match self.trusted_keys_of(parsed.header()).await? {
            None => Ok(()),
            Some(trusted) => Ok(envelope::identify_caller(&trusted, tls_key, self.now())?),
        }
    }

    /// Steps 3 to 5 of a NotifyConnection: the TLS key is a key of the
    /// connection, or, for a KEY_ROTATED notice, the notice's `new_key`, with
    /// the notice signed by a key of the connection (checked here, since
    /// until then nothing ties the caller to the connection).
    pub async fn identify_notice_caller(
        &self,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
    ) -> Result<(), FederationError> {
        let now = self.now();
        let parsed = envelope::parse::<pb::ConnectionNoticePayload>(sealed)?;
        parsed.check_recipient(&self.identity.current().instance_id)?;
        let trusted = self
            .trusted_keys_of(parsed.header())
            .await?
            .unwrap_or_default();
        if envelope::identify_caller(&trusted, tls_key, now).is_ok() {
            return Ok(());
        }
        let notice = parsed.unverified_payload();
        let new_key = match notice.kind() {
            pb::NoticeKind::KeyRotated => notice.new_key.as_ref(),
            _ => None,
        };
        match new_key {
            Some(new_key)
                if parsed.proves_rotation_to(&new_key.public_key, &trusted, tls_key, now) =>
            {
                Ok(())
            }
            _ => Err(EnvelopeError::Stranger.into()),
        }
    }

    /// Steps 3 to 5 of a Ping: the TLS key is a key of the connection.
    pub async fn identify_ping_caller(
        &self,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
    ) -> Result<(), FederationError> {
        let parsed = envelope::parse::<pb::PingPayload>(sealed)?;
        parsed.check_recipient(&self.identity.current().instance_id)?;
        let trusted = self
            .trusted_keys_of(parsed.header())
            .await?
            .unwrap_or_default();
        Ok(envelope::identify_caller(&trusted, tls_key, self.now())?)
    }

    /// The keys trusted on the open (PENDING, ACTIVE or SUSPENDED) connection
    /// with the header's sender in its workspace; `None` without one. Read
    /// from the store, not the peer cache, as `inbound` reads them: a key
    /// rotation applied by another replica counts at once.
    async fn trusted_keys_of(
        &self,
        header: &pb::EnvelopeHeader,
    ) -> Result<Option<Vec<TrustedKey>>, FederationError> {
        let Some(connection) = self
            .store
            .find_open_connection(&header.workspace, &header.sender_instance_id)
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(self.trusted_keys(&connection).await?))
    }
}
