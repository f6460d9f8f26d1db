//! ContainerManager: exports of a container (its record and disk, for another platform) and
//! imports of one, from an archive or an uploaded disk.

use super::*;

impl ContainerManager<'_> {
    /// Exports a stopped container for another platform (`import` there): its type, state,
    /// requirements and disk, with its identity here.
    pub async fn export(&self, id: ContainerId) -> Result<ContainerExport, CoreError> {
        let (mut export, disk) = self.export_parts(id).await?;
        let data = match disk {
            ExportDisk::Bytes(data) => data,
            ExportDisk::Agent { url, export: at } => {
                let reference = crate::driver::remote::agent_image(&export.type_id, &url, &at);
                let token = self.svc.agent_token().to_string();
                crate::driver::remote::materialize(reference, &token)
                    .await
                    .map_err(|e| CoreError::Conflict(format!("server of container {id}: {e}")))?
                    .data
            }
        };
        export.format = ContainerExport::FORMAT;
        export.disk_hex = hex::encode(&data);
        Ok(export)
    }

    /// A stopped container's description (format 2: no disk in it) and where its disk is, for
    /// an export that streams it (`crate::export_archive`).
    pub async fn export_parts(
        &self,
        id: ContainerId,
    ) -> Result<(ContainerExport, ExportDisk), CoreError> {
        let id = id.0;
        let (driver, server, row) = self.guest(id).await?;
        let status = parse_status(row.id, &row.status)?;
        check_status(id, status, "container export", &[ContainerStatus::Stopped]).map_err(|m| {
            if status.is_gone() {
                return CoreError::Conflict(format!("{m}: it has nothing left to export"));
            }
            CoreError::Conflict(format!(
                "{m}; stop it first with `cloud48 container stop {id}`"
            ))
        })?;
        let image = driver
            .export(&row.guest_id)
            .await
            .map_err(|e| CoreError::Conflict(format!("server {server}: {e}")))?;
        let disk = match crate::driver::remote::reference_of(&image)
            .map_err(|e| CoreError::Conflict(format!("server {server}: {e}")))?
        {
            Some((url, export)) => ExportDisk::Agent { url, export },
            None => ExportDisk::Bytes(image.data),
        };
        Ok((
            ContainerExport {
                format: ContainerExport::STREAMED,
                platform: self.svc.platform_name().to_string(),
                container_id: ContainerId(row.id),
                guest_id: row.guest_id,
                type_id: row.type_id,
                requirements: serde_json::from_str(&row.requirements).unwrap_or_default(),
                state_hex: hex::encode(&row.state),
                disk_hex: String::new(),
            },
            disk,
        ))
    }

    /// The driver and server name of a container that is on a server, with its row.
    pub(super) async fn guest(
        &self,
        id: i64,
    ) -> Result<
        (
            std::sync::Arc<dyn crate::driver::Driver>,
            String,
            container::Model,
        ),
        CoreError,
    > {
        let row = load_container(self.svc.db(), id).await?;
        let server_id = row
            .server_id
            .ok_or_else(|| CoreError::Conflict(format!("container {id} is on no server (yet)")))?;
        let (driver, server) = self.svc.fleet().named_driver(server_id).ok_or_else(|| {
            CoreError::Conflict(format!("server #{server_id} has no driver in this core"))
        })?;
        Ok((driver, server, row))
    }

    /// Imports a container exported by another platform: a new container here, placed by the
    /// factory and created from the exported disk (stopped), that records where it came from.
    /// Returns (command, container).
    pub async fn import(
        &self,
        export: &ContainerExport,
        project: Option<&str>,
        requested_by: &str,
    ) -> Result<(CommandId, ContainerId), CoreError> {
        if export.format == ContainerExport::STREAMED {
            return Err(CoreError::invalid(
                "format",
                "a format 2 export is a tar archive: upload the file `cloud48 container export` wrote as it is (Content-Type: application/x-tar)",
            ));
        }
        if export.format != ContainerExport::FORMAT {
            return Err(CoreError::invalid(
                "format",
                format!(
                    "export format {} is not supported (this core reads format {} as JSON and {} as a tar archive)",
                    export.format,
                    ContainerExport::FORMAT,
                    ContainerExport::STREAMED
                ),
            ));
        }
        let disk = hex::decode(&export.disk_hex)
            .map_err(|e| CoreError::invalid("disk_hex", format!("not hex: {e}")))?;
        if crate::driver::remote::is_reference(&disk) {
            return Err(CoreError::invalid(
                "disk_hex",
                "is a reference to an agent's export, not a disk; export the container again with `cloud48 container export`",
            ));
        }
        let image = crate::driver::GuestImage {
            type_id: export.type_id.clone(),
            data: disk,
        };
        self.import_disk(export, image, project, requested_by).await
    }

    /// Imports a container uploaded to this core as an archive (`crate::export_archive`):
    /// `export` is its description, `upload` the id of the upload that holds its disk
    /// (`Services::upload`), which its server's agent pulls from the core.
    pub async fn import_upload(
        &self,
        export: &ContainerExport,
        upload: &str,
        project: Option<&str>,
        requested_by: &str,
    ) -> Result<(CommandId, ContainerId), CoreError> {
        if !export.disk_hex.is_empty() {
            return Err(CoreError::invalid(
                "disk_hex",
                "the archive's description holds a disk inline as well as the disk file beside it: an archive's description names no disk (`disk_hex` empty); export the container again with `cloud48 container export`",
            ));
        }
        if export.format != ContainerExport::STREAMED {
            return Err(CoreError::invalid(
                "format",
                format!(
                    "the archive's description says format {} (an archive holds format {} with its disk beside it)",
                    export.format,
                    ContainerExport::STREAMED
                ),
            ));
        }
        let image = crate::driver::remote::core_upload(&export.type_id, upload);
        self.import_disk(export, image, project, requested_by).await
    }

    /// What both imports share, once the disk is known.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub(super) async fn import_disk(
        &self,
        export: &ContainerExport,
        image: crate::driver::GuestImage,
        project: Option<&str>,
        requested_by: &str,
    ) -> Result<(CommandId, ContainerId), CoreError> {
        let project = crate::projects::named(self.svc.db(), project).await?;
        if export.platform == self.svc.platform_name() {
            return Err(CoreError::invalid(
                "platform",
                "this container was exported by this platform; use `cloud48 container clone` to copy it here",
            ));
        }
        if export.guest_id.is_empty() || export.platform.is_empty() {
            return Err(CoreError::invalid(
                "guest_id",
                "the export names no origin platform or guest id",
            ));
        }
        let state = hex::decode(&export.state_hex)
            .map_err(|e| CoreError::invalid("state_hex", format!("not hex: {e}")))?;
        let new = prepare_container(
            self.svc,
            &export.type_id,
            None,
            Some(export.requirements.clone()),
            (None, project.id),
            Some(state),
        )
        .await?;
        let txn = self.svc.db().begin().await?;
        let (id, _) = insert_container(self.svc.platform_name(), &txn, new).await?;
        origin_identity::ActiveModel {
            container_id: Set(id),
            origin_platform: Set(export.platform.clone()),
            origin_container_id: Set(export.container_id.0),
            guest_id: Set(export.guest_id.clone()),
            imported_at: Set(now_ms()),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        self.submit_create(
            txn,
            id,
            crate::commands::params::Create {
                image: Some(image),
                start: false,
                ..crate::commands::params::Create::on(None)
            },
            requested_by,
        )
        .await
    }
}
